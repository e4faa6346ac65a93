"""LangSmith's `LangChainTracer`, hardened, records the same run trees as bare.

A real `langsmith.Client` (default background export threads) sends to a local fake
LangSmith API (`_langsmith_server.py`); the runs it received are merged per id and
compared bare vs hardened field by field: names, run types, parent links (as paths of
names), inputs, outputs, tags, extra/metadata, events (new_token included), errors.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

langsmith = pytest.importorskip("langsmith")
pytest.importorskip("langchain_core.tracers.langchain")

import langsmith.run_trees as ls_run_trees  # noqa: E402
import langsmith.utils as ls_utils  # noqa: E402
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.tracers.langchain import LangChainTracer  # noqa: E402
from langsmith import Client, traceable  # noqa: E402

import safecallbacks  # noqa: E402

from ._compare import assert_same  # noqa: E402
from ._langsmith_server import (  # noqa: E402
    FakeLangSmith,
    RunOp,
    duration,
    fake_langsmith,
    merge_runs,
    post_counts,
    traces,
)

try:
    from langsmith import env as ls_env
except ImportError:  # pragma: no cover - older langsmith
    ls_env = None

FLUSH_TIMEOUT = 10.0
REPLY = "hello there big wide world"
WORDS = len(REPLY.split())


# -- the chain ----------------------------------------------------------------------------
@tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


def shout(text: str) -> str:
    return text.upper() + "!"


def fake_model(*replies: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=r) for r in replies]))


def make_chain(*replies: str, extra: Runnable[Any, Any] | None = None) -> Runnable[Any, Any]:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You answer in a few words."), ("human", "Tell me about {topic}")]
    )
    chain = prompt | fake_model(*(replies or (REPLY,))) | StrOutputParser()
    if extra is not None:
        chain = chain | extra
    return chain | RunnableLambda(shout) | word_count


CALL_CONFIG: dict[str, Any] = {"tags": ["integration"], "metadata": {"suite": "langsmith"}}


def run_chain(
    style: str, tracer: LangChainTracer, *, extra: Runnable[Any, Any] | None = None
) -> Any:
    config: RunnableConfig = {**CALL_CONFIG, "callbacks": [tracer]}  # type: ignore[typeddict-item]
    if style == "invoke":
        return make_chain(extra=extra).invoke({"topic": "cats"}, config=config)
    if style == "stream":
        return list(make_chain(extra=extra).stream({"topic": "cats"}, config=config))
    if style == "astream":

        async def consume() -> list[Any]:
            chain = make_chain(extra=extra)
            return [chunk async for chunk in chain.astream({"topic": "cats"}, config=config)]

        return asyncio.run(consume())
    if style == "batch":
        chain = make_chain(REPLY, REPLY, REPLY, extra=extra)
        inputs = [{"topic": "cats"}, {"topic": "dogs"}, {"topic": "owls"}]
        return chain.batch(inputs, config=config)
    raise AssertionError(style)


# -- fixtures -----------------------------------------------------------------------------
def _langsmith_threads() -> set[threading.Thread]:
    found = set()
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        if thread.is_alive() and getattr(target, "__module__", "").startswith("langsmith"):
            found.add(thread)
    return found


def _wait_threads_gone(before: set[threading.Thread], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = _langsmith_threads() - before
        if not left or time.monotonic() > deadline:
            return [t.name for t in left]
        time.sleep(0.05)


def _accepts_timeout(method: Callable[..., Any]) -> bool:
    return "timeout" in inspect.signature(method).parameters


def flush_client(client: Client, timeout: float = FLUSH_TIMEOUT) -> None:
    """Wait, bounded, until the client's background threads sent everything queued."""
    queue = client.tracing_queue
    if _accepts_timeout(client.flush):
        client.flush(timeout=timeout)
    elif queue is not None:  # older langsmith: flush() has no timeout, so wait first
        deadline = time.monotonic() + timeout
        while queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        if not queue.unfinished_tasks:
            client.flush()
    assert queue is None or queue.unfinished_tasks == 0, "the client did not flush in time"


def _retire(client: Client) -> None:
    """Flush (bounded) and stop a client's background export threads."""
    try:
        flush_client(client)
    finally:
        if _accepts_timeout(client.cleanup):
            client.cleanup(timeout=0)
        else:
            client.cleanup()


@pytest.fixture
def server() -> Iterator[FakeLangSmith]:
    before = _langsmith_threads()
    with fake_langsmith() as srv:
        yield srv
        srv.recover()
        for client in srv.clients:
            _retire(client)
    assert not srv.unparsed, srv.unparsed
    left = _wait_threads_gone(before, timeout=10.0)
    assert not left, f"LangSmith client threads still running: {left}"


def new_client(srv: FakeLangSmith) -> Client:
    client = Client(api_url=srv.url, api_key="test")
    srv.clients.append(client)
    return client


def drain(srv: FakeLangSmith, client: Client, tracer: LangChainTracer | None = None) -> list[RunOp]:
    """Everything the client exported so far, after a bounded flush."""
    if tracer is not None and type(tracer) is not LangChainTracer:
        assert safecallbacks.flush(tracer, timeout=5.0)
        stats = safecallbacks.stats(tracer)
        # Inline isolation swallows what a hook raises: none of the tracer's hooks may fail.
        assert stats.failed == 0 and not stats.errors, stats
        assert stats.delivered > 0, stats
    flush_client(client)
    assert not srv.unparsed, srv.unparsed
    return srv.take()


def harden(tracer: LangChainTracer) -> LangChainTracer:
    hardened = safecallbacks.harden(tracer)
    assert hardened is tracer, "harden() hardens in place and returns the handler"
    assert isinstance(hardened, LangChainTracer)
    assert type(hardened) is not LangChainTracer
    assert safecallbacks.stats(hardened).mode == "inline", "auto mode runs tracers inline"
    return hardened


def record(
    srv: FakeLangSmith, work: Callable[[LangChainTracer], Any], *, hardened: bool
) -> tuple[Any, list[RunOp]]:
    client = new_client(srv)
    tracer = LangChainTracer(client=client)
    if hardened:
        tracer = harden(tracer)
    result = work(tracer)
    return result, drain(srv, client, tracer)


def names(trace: list[dict[str, Any]]) -> list[str]:
    return [run["path"] for run in trace]


def assert_once_each(ops: list[RunOp]) -> None:
    """Every run was created exactly once (a duplicate tracer posts the same id twice)."""
    twice = {run_id: n for run_id, n in post_counts(ops).items() if n != 1}
    assert not twice, f"runs posted more than once: {twice}"
    assert set(merge_runs(ops)) == set(post_counts(ops)), "a run was patched but never posted"


CHAIN_PATHS = [
    "RunnableSequence#0",
    "RunnableSequence#0/ChatPromptTemplate#0",
    "RunnableSequence#0/GenericFakeChatModel#1",
    "RunnableSequence#0/StrOutputParser#2",
    "RunnableSequence#0/shout#3",
    "RunnableSequence#0/word_count#4",
]


# -- 1. same run tree, every call style ------------------------------------------------
@pytest.mark.parametrize("style", ["invoke", "stream", "astream", "batch"])
def test_same_run_tree_hardened_as_bare(server: FakeLangSmith, style: str) -> None:
    def work(tracer: LangChainTracer) -> Any:
        return run_chain(style, tracer)

    bare_result, bare_ops = record(server, work, hardened=False)
    hard_result, hard_ops = record(server, work, hardened=True)

    assert hard_result == bare_result
    bare, hardened = traces(merge_runs(bare_ops)), traces(merge_runs(hard_ops))
    expected_traces = 3 if style == "batch" else 1
    assert len(bare) == expected_traces
    for trace in bare:
        assert names(trace) == CHAIN_PATHS
        llm = trace[2]
        assert llm["run_type"] == "llm"
        events = [event["name"] for event in llm["events"]]
        assert events[0] == "start" and events[-1] == "end", events
        assert ("new_token" in events) == (style in ("stream", "astream")), events
        assert trace[-1]["outputs"] == {"output": WORDS}
        assert "integration" in trace[0]["tags"]
        assert trace[0]["extra"]["metadata"]["suite"] == "langsmith"
    assert_once_each(bare_ops)
    assert_once_each(hard_ops)
    assert_same(bare, hardened)


def test_tracer_runs_inline(server: FakeLangSmith) -> None:
    client = new_client(server)
    tracer = harden(LangChainTracer(client=client))
    assert safecallbacks.stats(tracer).mode == "inline"
    assert tracer.client is client  # its own state, read through
    run_chain("invoke", tracer)
    assert safecallbacks.stats(tracer).mode == "inline"
    assert tracer.latest_run is not None and tracer.latest_run.name == "RunnableSequence"
    drain(server, client, tracer)


def test_error_fields_same(server: FakeLangSmith) -> None:
    def explode(text: str) -> str:
        raise ValueError(f"cannot handle {text!r}")

    def work(tracer: LangChainTracer) -> Any:
        with pytest.raises(ValueError, match="cannot handle"):
            run_chain("invoke", tracer, extra=RunnableLambda(explode))

    _, bare_ops = record(server, work, hardened=False)
    _, hard_ops = record(server, work, hardened=True)
    bare, hardened = traces(merge_runs(bare_ops)), traces(merge_runs(hard_ops))
    assert len(bare) == 1
    failed = {run["path"]: run for run in bare[0] if run.get("error")}
    assert set(failed) == {"RunnableSequence#0", "RunnableSequence#0/explode#3"}
    assert "ValueError" in failed["RunnableSequence#0/explode#3"]["error"]
    assert_same(bare, hardened)


# -- 2. timestamps are stamped when the hook runs ---------------------------------------
def test_durations_recorded_like_bare(server: FakeLangSmith) -> None:
    def slow(text: str) -> str:
        time.sleep(0.3)
        return text

    def work(tracer: LangChainTracer) -> Any:
        return run_chain("stream", tracer, extra=RunnableLambda(slow))

    durations = {}
    recorded = {}
    for hardened in (False, True):
        _, ops = record(server, work, hardened=hardened)
        runs = merge_runs(ops)
        (slow_run,) = [run for run in runs.values() if run.get("name") == "slow"]
        durations[hardened] = duration(slow_run)
        recorded[hardened] = traces(runs)
    assert durations[False] >= 0.3, durations
    assert durations[True] >= 0.3, durations
    assert durations[True] < 0.3 + 2.0, durations
    assert_same(recorded[False], recorded[True])


# -- 3. LANGSMITH_TRACING: the env tracer and a config tracer ----------------------------
def _clear_env_caches() -> None:
    ls_utils.get_env_var.cache_clear()
    ls_utils.get_tracer_project.cache_clear()
    if ls_env is not None and hasattr(ls_env, "get_langchain_env_var_metadata"):
        ls_env.get_langchain_env_var_metadata.cache_clear()


@pytest.fixture
def env_tracing(server: FakeLangSmith, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLangSmith]:
    """LANGSMITH_TRACING=true against the fake server, with a fresh cached env client."""
    for name in (
        "LANGCHAIN_TRACING_V2",
        "LANGCHAIN_TRACING",
        "LANGCHAIN_ENDPOINT",
        "LANGCHAIN_API_KEY",
        "LANGCHAIN_PROJECT",
        "LANGSMITH_PROJECT",
        "LANGSMITH_RUNS_ENDPOINTS",
        "LANGSMITH_TRACING_V2",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANGSMITH_TRACING", "true")
    monkeypatch.setenv("LANGSMITH_ENDPOINT", server.url)
    monkeypatch.setenv("LANGSMITH_API_KEY", "test")
    monkeypatch.setattr(ls_run_trees, "_CLIENT", None)
    _clear_env_caches()
    try:
        yield server
    finally:
        env_client = ls_run_trees._CLIENT
        if env_client is not None:
            _retire(env_client)
        monkeypatch.undo()
        _clear_env_caches()


def env_client() -> Client:
    from langchain_core.tracers.langchain import get_client

    client = get_client()
    assert client.api_url == ls_run_trees._CLIENT.api_url  # type: ignore[union-attr]
    return client


def test_env_tracing_with_config_tracer_traces_once(env_tracing: FakeLangSmith) -> None:
    srv = env_tracing
    client = env_client()
    assert client.api_url == srv.url

    recordings = {}
    for hardened in (False, True):
        tracer = LangChainTracer()  # the env's client, as users write it
        assert tracer.client is client
        if hardened:
            tracer = harden(tracer)
        run_chain("invoke", tracer)
        ops = drain(srv, client, tracer)
        assert_once_each(ops)
        recordings[hardened] = traces(merge_runs(ops))
        assert len(recordings[hardened]) == 1, "one invoke, one trace"
        assert names(recordings[hardened][0]) == CHAIN_PATHS
    assert_same(recordings[False], recordings[True])


def test_install_hardens_env_tracer(env_tracing: FakeLangSmith) -> None:
    srv = env_tracing
    client = env_client()
    # What the running chain sees, captured while it runs (uninstall() later gives the
    # handlers it hardened their own class back).
    seen: list[list[tuple[type, str | None]]] = []

    def mode_of(handler: LangChainTracer) -> str | None:
        if type(handler) is LangChainTracer:
            return None
        return safecallbacks.stats(handler).mode

    def inspect_handlers(text: str, config: RunnableConfig) -> str:
        handlers = getattr(config.get("callbacks"), "handlers", [])
        tracers = [h for h in handlers if isinstance(h, LangChainTracer)]
        seen.append([(type(h), mode_of(h)) for h in tracers])
        return text

    def run() -> list[list[dict[str, Any]]]:
        chain = make_chain(extra=RunnableLambda(inspect_handlers))
        assert chain.invoke({"topic": "cats"}, config=CALL_CONFIG) == WORDS  # type: ignore[arg-type]
        ops = drain(srv, client)
        assert_once_each(ops)
        return traces(merge_runs(ops))

    bare = run()
    assert seen == [[(LangChainTracer, None)]], "bare: the env tracer, once"

    seen.clear()
    safecallbacks.install()
    try:
        hardened = run()
    finally:
        safecallbacks.uninstall()
    (hard_seen,) = seen
    assert len(hard_seen) == 1, f"one env tracer, not {hard_seen}"
    ((env_type, env_mode),) = hard_seen
    assert env_type is not LangChainTracer, "the env tracer was not hardened"
    assert issubclass(env_type, LangChainTracer)
    assert env_mode == "inline"

    assert len(bare) == 1
    assert [p.split("/")[-1] for p in names(bare[0])][-3:] == [
        "inspect_handlers#3",
        "shout#4",
        "word_count#5",
    ]
    assert_same(bare, hardened)


# -- 4. @traceable inside a traced chain -------------------------------------------------
@traceable(name="reverse_words")
def reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


def call_traceable(text: str) -> str:
    return reverse_words(text)


def test_traceable_nested_like_bare(server: FakeLangSmith) -> None:
    def work(tracer: LangChainTracer) -> Any:
        return run_chain("invoke", tracer, extra=RunnableLambda(call_traceable))

    _, bare_ops = record(server, work, hardened=False)
    _, hard_ops = record(server, work, hardened=True)
    bare, hardened = traces(merge_runs(bare_ops)), traces(merge_runs(hard_ops))
    assert len(bare) == 1, "the @traceable run joined the chain's trace"
    by_path = {run["path"]: run for run in bare[0]}
    nested = by_path["RunnableSequence#0/call_traceable#3/reverse_words#0"]
    assert nested["inputs"] == {"text": REPLY}
    assert nested["outputs"] == {"output": " ".join(reversed(REPLY.split()))}
    assert_once_each(bare_ops)
    assert_once_each(hard_ops)
    assert_same(bare, hardened)


# -- 5. a hung or failing LangSmith never stalls the stream -------------------------------
@pytest.mark.parametrize("failure", ["hang", "error"])
def test_unhealthy_server_never_stalls_stream(server: FakeLangSmith, failure: str) -> None:
    server.mode = failure
    server.hang_seconds = 3.0
    client = new_client(server)
    tracer = harden(LangChainTracer(client=client))
    assert safecallbacks.stats(tracer).mode == "inline"
    words = " ".join(f"w{i}" for i in range(40))
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])

    def stream_once(q: str) -> list[float]:
        chain = prompt | fake_model(words) | StrOutputParser()
        stamps = [time.monotonic()]
        chunks = []
        for chunk in chain.stream({"q": q}, config={"callbacks": [tracer]}):
            chunks.append(chunk)
            stamps.append(time.monotonic())
        assert "".join(chunks) == words
        return [b - a for a, b in itertools.pairwise(stamps)]

    gaps = stream_once("first")
    # The export of the first trace is now hanging or failing on the SDK's thread.
    assert server.wait_for(
        lambda s: any(a.path == "/runs/multipart" for a in s.arrivals), timeout=5.0
    ), "the client never tried to export"
    gaps += stream_once("second")  # streamed while the export is stuck
    assert len(gaps) > 40
    assert max(gaps) < 1.0, f"longest gap between chunks {max(gaps):.3f}s"
    assert sum(gaps) < 2.0, f"streams took {sum(gaps):.3f}s"
    if failure == "error":
        assert server.wait_for(lambda s: any(r.status == 500 for r in s.requests), timeout=5.0), (
            "the server never answered 500"
        )
    else:  # once the server answers again, both traces arrive whole
        server.recover()
        recorded = traces(merge_runs(drain(server, client, tracer)))
        prompts = [trace[1]["inputs"] for trace in recorded]  # the prompt run's inputs
        assert prompts == [{"q": "first"}, {"q": "second"}]
        assert [names(trace) for trace in recorded] == [
            [
                "RunnableSequence#0",
                "RunnableSequence#0/ChatPromptTemplate#0",
                "RunnableSequence#0/GenericFakeChatModel#1",
                "RunnableSequence#0/StrOutputParser#2",
            ]
        ] * 2
