"""A Streamlit page shows the same thing with its LangChain handler hardened as bare.

The app (``_streamlit_app.render``) runs under Streamlit's own test harness,
``streamlit.testing.v1.AppTest``: a real ``ScriptRunner`` thread with a real session context,
the page rebuilt from the ``ForwardMsg`` deltas the script sent. Streamlit finds the session
through the calling thread (``get_script_run_ctx()``), not a context variable, so a hook
delivered on any other thread renders nothing (``NoSessionContext``).

For ``StreamlitCallbackHandler`` (a library's handler) and the ``StreamHandler`` apps write
(``on_llm_new_token`` into ``st.empty()``), with ``invoke``, ``stream`` and ``astream``, bare
vs ``harden()`` and vs ``install()``, compared field by field:

- the page right after ``at.run()`` returns (expanders with labels and expanded state,
  markdown bodies, the answer written after the chain);
- every delta the script sent, in order, with its place on the page: the streamed tokens
  one by one, expanders relabelled, elements replaced;
- what the handler holds afterwards (thought labels, the streamed text).

Each hardened run is done twice: the script reads nothing more once the chain returns, or it
calls ``safecallbacks.flush(handler)`` first (a page cannot be read again after its run).
What ``safecallbacks.stats(handler)`` says is printed (``-s``), not asserted.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import pytest

from tests._imports import import_or_skip, require_langchain_core

require_langchain_core("1.4", "langchain-community 0.4 (Streamlit's handler)")

import_or_skip("streamlit")
import_or_skip("langchain_community.callbacks.streamlit")

from google.protobuf.json_format import MessageToDict  # noqa: E402
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg  # noqa: E402
from streamlit.runtime.forward_msg_queue import ForwardMsgQueue  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import safecallbacks  # noqa: E402
from safecallbacks._adapt import THREAD_TRIAL_AFTER  # noqa: E402

from . import _streamlit_app  # noqa: E402
from ._compare import differences, plain, scrub  # noqa: E402

KINDS = ["library", "app"]
METHODS = ["invoke", "stream", "astream"]
RUN_TIMEOUT = 20.0


def app_script(kind: str, attach: str, method: str, flush: bool) -> None:
    """The script AppTest runs (its body is the page's source: imports inside)."""
    from tests.integration._streamlit_app import render

    render(kind, attach, method, flush)


# -- reading the page -------------------------------------------------------------------


def node_record(node: Any) -> dict[str, Any]:
    """One node of AppTest's element tree: its type, its proto's fields, its children."""
    proto = getattr(node, "proto", None)
    record: dict[str, Any] = {"type": getattr(node, "type", type(node).__name__)}
    if proto is not None:
        record["proto"] = MessageToDict(proto)
    children = getattr(node, "children", None) or {}
    if children:
        record["children"] = [node_record(children[i]) for i in sorted(children)]
    return record


def delta_record(msg: ForwardMsg) -> dict[str, Any]:
    """A delta the script sent: where on the page, and what (new element, block...)."""
    return {"path": list(msg.metadata.delta_path), "delta": MessageToDict(msg.delta)}


@pytest.fixture
def deltas() -> Iterator[list[dict[str, Any]]]:
    """Every delta enqueued while the test runs, before Streamlit coalesces them."""
    sent: list[dict[str, Any]] = []
    previous = ForwardMsgQueue._before_enqueue_msg

    def record(msg: ForwardMsg) -> None:
        if msg.WhichOneof("type") == "delta":
            sent.append(delta_record(msg))

    ForwardMsgQueue.on_before_enqueue_msg(record)
    yield sent
    ForwardMsgQueue.on_before_enqueue_msg(previous)


def run_page(
    kind: str, attach: str, method: str, flush: bool, deltas: list[dict[str, Any]]
) -> dict[str, Any]:
    """Run the app once; the page right after ``at.run()``, its deltas, the handler's state."""
    deltas.clear()
    at = AppTest.from_function(app_script, args=(kind, attach, method, flush))
    at.run(timeout=RUN_TIMEOUT)
    run = dict(_streamlit_app.LAST_RUN)
    assert not at.exception, [e.value for e in at.exception]
    assert [c.value for c in at.caption] == ["done"], "the script did not finish"
    return {
        "page": node_record(at.main),
        "deltas": list(deltas),
        "state": run["state"],
        "run": run,
    }


# -- the comparisons --------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def main_module_kept() -> Iterator[None]:
    """Streamlit runs each script as ``__main__`` and leaves it there; later tests (a spawned
    process re-imports ``__main__``) need the real one back."""
    import sys

    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="module")
def bare_pages() -> dict[tuple[str, str], dict[str, Any]]:
    """Bare recordings, one per (kind, method), made on first use."""
    return {}


def bare_page(
    pages: dict[tuple[str, str], dict[str, Any]],
    kind: str,
    method: str,
    deltas: list[dict[str, Any]],
) -> dict[str, Any]:
    if (kind, method) not in pages:
        pages[(kind, method)] = run_page(kind, "bare", method, False, deltas)
    return pages[(kind, method)]


def comparable(recording: dict[str, Any]) -> dict[str, Any]:
    return plain({key: recording[key] for key in ("page", "deltas", "state")})


def delta_line(delta: dict[str, Any]) -> str:
    """A delta in one line: its place on the page, its kind, its text."""
    where = ".".join(str(index) for index in delta["path"])
    body = delta["delta"]
    for kind in ("newElement", "addBlock"):
        if kind in body:
            inner = body[kind]
            name = next((key for key in inner if key not in ("allowEmpty", "id")), "?")
            value = inner.get(name)
            text = value.get("body", value.get("label", "")) if isinstance(value, dict) else ""
            return f"{where} {name} {text!r:.70}"
    return f"{where} {sorted(body)}"


def assert_same_page(bare: dict[str, Any], hardened: dict[str, Any]) -> None:
    """``assert_same`` on page, deltas and state; a delta-by-delta diff when they differ."""
    found = differences(scrub(comparable(bare)), scrub(comparable(hardened)))
    if found:
        found += [
            "deltas, bare vs hardened:",
            *difflib.unified_diff(
                [delta_line(d) for d in bare["deltas"]],
                [delta_line(d) for d in hardened["deltas"]],
                "bare",
                "hardened",
                n=1,
                lineterm="",
            ),
        ]
    assert not found, "hardened rendered a different page than bare:\n" + "\n".join(found[:60])


@pytest.mark.parametrize("flush", [False, True], ids=["no-flush", "flush"])
@pytest.mark.parametrize("attach", ["harden", "install"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_page_same_hardened_as_bare(
    bare_pages: dict[tuple[str, str], dict[str, Any]],
    deltas: list[dict[str, Any]],
    kind: str,
    method: str,
    attach: str,
    flush: bool,
) -> None:
    bare = bare_page(bare_pages, kind, method, deltas)
    hardened = run_page(kind, attach, method, flush, deltas)
    handler = hardened["run"]["handler"]
    try:
        stats = hardened["run"].get("stats")
        print(f"\n{kind}/{method}/{attach}/{'flush' if flush else 'no-flush'}: {stats!r}")
        assert stats is not None, "the handler was not hardened"
        if flush:
            assert hardened["run"]["flushed"], "flush() timed out"
        if method == "astream":
            # Different on purpose (docs/modes.md, "What differs on purpose"): bare, LangChain's
            # async manager runs this sync handler's hooks on executor threads, where
            # Streamlit has no session, so the bare page shows none of them. Hardened, they
            # run on the caller's thread, where the session is: the reply is on the page.
            assert not any(_streamlit_app.REPLY in text for text in markdown(bare["page"]))
            assert _streamlit_app.REPLY in markdown(hardened["page"])
            return
        if kind == "app":
            # The application's handler is offloaded until its first hooks fail on a worker
            # (no session there); from then on it runs on the caller's thread. The events
            # that revealed it are counted failed, not replayed (their side effects may be
            # half done): the page misses those first tokens' updates, nothing else.
            assert stats.failed == THREAD_TRIAL_AFTER and stats.mode == "inline", stats
            bare = {**bare, "deltas": without_first_tokens(bare["deltas"], THREAD_TRIAL_AFTER)}
        assert_same_page(bare, hardened)
    finally:
        if attach == "harden":  # uninstall() already gave an installed one its class back
            safecallbacks.close(handler, timeout=5.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_bare_page_shows_the_run(
    bare_pages: dict[tuple[str, str], dict[str, Any]],
    deltas: list[dict[str, Any]],
    kind: str,
    method: str,
) -> None:
    """The baseline is real: where Streamlit renders the hooks at all, the run is on the page."""
    bare = bare_page(bare_pages, kind, method, deltas)
    shown = [
        (node["type"], node["proto"].get("label", node["proto"].get("body")))
        for node in walk(bare["page"])
        if node["type"] in ("expander", "markdown")
    ]
    answer = ("markdown", "**Answer:** " + repr(answer_of(method)))
    if method == "astream":
        # Bare, LangChain's async manager runs a sync handler's hooks in executor threads:
        # no session context there, so none of them renders (hardened must match that).
        assert shown == [answer]
    elif kind == "library":
        tool_label = "✅ **shout:** {'text': '" + _streamlit_app.REPLY + "'}"
        # One thought: its streamed tokens, then the tool's output; collapsed once complete.
        tokens, output = ("markdown", _streamlit_app.REPLY), ("markdown", f"**{shouted()}**")
        assert shown == [("expander", tool_label), tokens, output, answer]
    else:
        assert shown == [("markdown", _streamlit_app.REPLY), answer]


def without_first_tokens(deltas: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The deltas without the updates of the reply's first ``count`` tokens."""
    first_word = _streamlit_app.REPLY.split()[0]
    index = next(i for i, d in enumerate(deltas) if delta_line(d).endswith(f"{first_word!r}"))
    return deltas[:index] + deltas[index + count :]


def markdown(page: dict[str, Any]) -> list[str]:
    return [str(node["proto"].get("body")) for node in walk(page) if node["type"] == "markdown"]


def shouted() -> str:
    return _streamlit_app.REPLY.upper()


def answer_of(method: str) -> Any:
    return shouted() if method == "invoke" else [shouted()]


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("children", []):
        yield from walk(child)
