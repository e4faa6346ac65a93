"""MLflow tracing's LangChain handler records the same traces hardened as bare.

``MlflowLangchainTracer`` (``mlflow.langchain``) is a tracing SDK's handler that is not a
``BaseTracer``: a plain ``BaseCallbackHandler`` whose hooks start MLflow spans and attach
them to MLflow's OpenTelemetry context (a ContextVar), so that a function decorated with
``@mlflow.trace`` called inside the chain nests under the span of the step calling it,
and ``mlflow.get_last_active_trace_id()`` read after the call is that call's trace.
Attached explicitly (``config={"callbacks": [...]}``) or injected into every callback
manager by ``mlflow.langchain.autolog()``.

Real MLflow writing to a file store in tmp (no server). Each case runs the chain
(prompt | chat model | parser | a lambda calling an ``@mlflow.trace`` function) bare,
then hardened, and compares, read right after the call returns and again after a flush:
the traces the call stored (how many, their span trees with names, parents, span types,
inputs, outputs, attributes and events, their metadata with token usage) and what the
last active trace id points at.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests._imports import import_or_skip

# MLflow starts usage telemetry at import unless told not to (and there is no network here).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import_or_skip("mlflow")
mlflow_langchain = import_or_skip("mlflow.langchain")
mlflow_tracer_module = import_or_skip("mlflow.langchain.langchain_tracer")

import mlflow  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda  # noqa: E402

import safecallbacks  # noqa: E402

from ._compare import assert_same  # noqa: E402
from ._mlflow_support import (  # noqa: E402
    CHAIN_ROOT,
    MLFLOW_VOLATILE,
    local_store,
    parents,
    stored_traces,
    trace_record,
    walk,
    which_trace,
)
from ._models import MetadataChatModel  # noqa: E402

MlflowLangchainTracer = mlflow_tracer_module.MlflowLangchainTracer

REPLY = "the quick brown fox"
USAGE = {"input_tokens": 4, "output_tokens": 9, "total_tokens": 13}
MODEL_NAME = "fake-model-1"


# -- the chain ---------------------------------------------------------------------------


@mlflow.trace(span_type="TOOL")
def shout(text: str) -> str:
    """User code traced with MLflow's decorator: must nest under the lambda's span."""
    return text.upper()


@dataclass
class Probe:
    """What the lambda saw from inside the run: MLflow tracers of its manager, active span."""

    tracers: list[Any] = field(default_factory=list)
    active_span: list[str | None] = field(default_factory=list)


def make_chain(probe: Probe, replies: int = 1) -> Runnable[Any, Any]:
    """prompt | chat model | parser | lambda -> @mlflow.trace: six spans in one trace."""

    def shout_step(text: str, config: RunnableConfig) -> str:
        manager = config.get("callbacks")
        for handler in getattr(manager, "handlers", []):
            if isinstance(handler, MlflowLangchainTracer) and handler not in probe.tracers:
                probe.tracers.append(handler)
        span = mlflow.get_current_active_span()
        probe.active_span.append(span.name if span is not None else None)
        return shout(text)

    model = MetadataChatModel(
        messages=iter(AIMessage(content=REPLY, usage_metadata=USAGE) for _ in range(replies))
    )
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "say {topic}")])
    return (
        prompt
        | model.with_config(metadata={"ls_model_name": MODEL_NAME})
        | StrOutputParser()
        | RunnableLambda(shout_step, name="shout_step")
    )


CHAIN_SPANS = frozenset(
    {
        CHAIN_ROOT,
        "ChatPromptTemplate",
        "MetadataChatModel",
        "StrOutputParser",
        "shout_step",
        "shout",
    }
)


def nests_user_code(spans: list[dict[str, Any]]) -> bool:
    """The chain's six spans in one tree, the ``@mlflow.trace`` one under the lambda's.

    (Where the other steps hang differs by call style in bare MLflow itself: on streams it
    parents each step under the span still active in its context, the previous step.)
    """
    found = parents(spans)
    return set(found) == CHAIN_SPANS and found["shout"] == "shout_step"


def run_chain(method: str, chain: Runnable[Any, Any], topic: str, config: RunnableConfig) -> str:
    """Run ``chain`` through one of LangChain's entry points; its joined output."""
    value = {"topic": topic}
    if method == "invoke":
        return str(chain.invoke(value, config=config))
    if method == "stream":
        return "".join(chain.stream(value, config=config))

    async def collect() -> str:
        return "".join([chunk async for chunk in chain.astream(value, config=config)])

    return asyncio.run(collect())


# -- attaching the handler ---------------------------------------------------------------

# Call style and the tracer's ``run_inline`` (MLflow's switch for async callbacks: without
# it LangChain runs the sync handler in an executor copy of the context on async paths, so
# bare MLflow itself cannot nest ``@mlflow.trace`` there; both are compared).
CASES = [
    pytest.param("invoke", False, id="invoke"),
    pytest.param("stream", False, id="stream"),
    pytest.param("astream", False, id="astream"),
    pytest.param("astream", True, id="astream-run_inline"),
]
WAYS = ["harden", "install", "autolog+install"]


@dataclass
class Attach:
    """How the handler is attached: the config of a call and hardening on or off."""

    way: str
    run_inline: bool
    hardened: bool
    explicit: Any = None  # the handler passed in the config (none under autolog)

    def config(self) -> RunnableConfig:
        return {"callbacks": [self.explicit]} if self.explicit is not None else {}


@pytest.fixture
def store(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with local_store(str(tmp_path), monkeypatch) as uri:
        yield uri


@pytest.fixture
def attach(store: str) -> Iterator[Callable[[str, bool, bool], Attach]]:
    """``attach(way, run_inline, hardened)``: set up one run; undone in teardown."""
    undo: list[Callable[[], None]] = []
    hardened_handlers: list[Any] = []

    def make(way: str, run_inline: bool, hardened: bool) -> Attach:
        while undo:  # the previous run's setup (bare before hardened) goes first
            undo.pop()()
        result = Attach(way, run_inline, hardened)
        if way == "autolog+install":
            mlflow_langchain.autolog(run_tracer_inline=run_inline, silent=True)
            undo.append(lambda: mlflow_langchain.autolog(disable=True, silent=True))
        elif hardened and way == "harden-class":
            # @harden on the class: every instance it makes is hardened.
            result.explicit = safecallbacks.harden(MlflowLangchainTracer)(run_inline=run_inline)
        else:
            result.explicit = MlflowLangchainTracer(run_inline=run_inline)
        if hardened and way == "harden":
            result.explicit = safecallbacks.harden(result.explicit)
        if hardened and way.startswith("harden"):
            if isinstance(result.explicit, MlflowLangchainTracer):
                hardened_handlers.append(result.explicit)
        elif hardened:
            safecallbacks.install()
            undo.append(safecallbacks.uninstall)
        return result

    yield make
    while undo:
        undo.pop()()
    for handler in hardened_handlers:
        safecallbacks.close(handler, timeout=5.0)


# -- what a call recorded ----------------------------------------------------------------


@dataclass
class Call:
    """One call's recording: read right after it returned, and after a flush."""

    output: str
    right_after: dict[str, Any]
    after_flush: dict[str, Any]
    probe: Probe
    modes: list[str]


def snapshot(before: set[str], last_active: str | None, last_local: str | None) -> dict[str, Any]:
    """The traces the call stored, and what the last active trace ids point at."""
    new = {k: v for k, v in stored_traces().items() if k not in before}
    return {
        "trace_count": len(new),
        "traces_by_root_span": by_root([trace_record(t) for t in new.values()]),
        "last_active_trace": which_trace(last_active, new),
        "last_active_trace_thread_local": which_trace(last_local, new),
    }


def by_root(traces: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Traces keyed by their root span's name (``name#2``... for repeats), so a missing or
    extra trace shows as such and the others are still compared field by field."""
    keyed: dict[str, dict[str, Any]] = {}
    for trace in sorted(traces, key=lambda t: str(t["root"])):
        key, count = str(trace["root"]), 1
        while key in keyed:
            count += 1
            key = f"{trace['root']}#{count}"
        keyed[key] = trace
    return keyed


def record(method: str, attached: Attach, topic: str = "foxes") -> Call:
    probe = Probe()
    before = set(stored_traces())
    output = run_chain(method, make_chain(probe), topic, attached.config())
    # Read right after the call returned: nothing flushed yet.
    last_active = mlflow.get_last_active_trace_id()
    last_local = mlflow.get_last_active_trace_id(thread_local=True)
    right_after = snapshot(before, last_active, last_local)

    reachable = [attached.explicit] if attached.explicit is not None else probe.tracers
    # Hardening swaps the handler's class for a generated subclass of its own.
    hardened = [h for h in reachable if type(h) is not MlflowLangchainTracer]
    for handler in hardened:
        assert safecallbacks.flush(handler, timeout=5.0), "hardened tracer did not flush"
    after_flush = snapshot(
        before, mlflow.get_last_active_trace_id(), mlflow.get_last_active_trace_id(True)
    )
    modes = [safecallbacks.stats(h).mode for h in hardened]
    return Call(output, right_after, after_flush, probe, modes)


def comparable(call: Call) -> dict[str, Any]:
    return {
        "output": call.output,
        "mlflow_tracers_in_run": len(call.probe.tracers),
        "active_span_seen_by_user_code": call.probe.active_span,
        "right_after_the_call": call.right_after,
        "after_flush": call.after_flush,
    }


def assert_bare_is_sound(call: Call, method: str, run_inline: bool) -> None:
    """What bare MLflow records, so the comparison compares something real."""
    assert call.output == REPLY.upper()
    assert len(call.probe.tracers) == 1
    recorded = call.right_after
    traces = recorded["traces_by_root_span"]
    assert f"{CHAIN_ROOT}#2" not in traces, list(traces)
    chain = traces[CHAIN_ROOT]
    assert chain["token_usage"] == USAGE
    assert chain["state"] == "OK"
    model = next(n for n in walk(chain["spans"]) if n["name"] == "MetadataChatModel")
    assert model["span_type"] == "CHAT_MODEL"
    assert recorded["last_active_trace"] == f"root span {CHAIN_ROOT}"
    if method == "astream" and not run_inline:
        # MLflow's own limitation without run_inline: the lambda's span is attached in an
        # executor copy of the context, so @mlflow.trace starts a trace of its own.
        assert recorded["trace_count"] == 2
        return
    assert recorded["trace_count"] == 1
    assert nests_user_code(chain["spans"]), parents(chain["spans"])
    assert call.probe.active_span == ["shout_step"]


# -- 1. the same traces ------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("method", "run_inline"), CASES)
def test_same_traces_hardened_as_bare(
    attach: Callable[[str, bool, bool], Attach], method: str, run_inline: bool, way: str
) -> None:
    bare = record(method, attach(way, run_inline, False))
    assert_bare_is_sound(bare, method, run_inline)

    hardened = record(method, attach(way, run_inline, True))

    print(f"safecallbacks mode of MlflowLangchainTracer ({way}, {method}): {hardened.modes}")
    assert_same(comparable(bare), comparable(hardened), MLFLOW_VOLATILE)
    assert hardened.modes, "no hardened MLflow tracer reached the run"


# -- 2. last active trace id, call after call --------------------------------------------


@pytest.mark.parametrize("way", ["harden", "install"])
@pytest.mark.parametrize(("method", "run_inline"), [CASES[0], CASES[3]])
def test_last_active_trace_is_this_calls_trace(
    attach: Callable[[str, bool, bool], Attach], method: str, run_inline: bool, way: str
) -> None:
    """Calls in a row, each read right after it returned: never one call behind."""
    attached = attach(way, run_inline, True)
    seen: list[str | None] = []
    for index in range(3):
        probe = Probe()
        before = set(stored_traces())
        run_chain(method, make_chain(probe), f"call-{index}", attached.config())
        last_active = mlflow.get_last_active_trace_id()
        new = {k: v for k, v in stored_traces().items() if k not in before}
        seen.append(which_trace(last_active, new))
        # and that trace holds this call's whole span tree, @mlflow.trace included
        chain = trace_record(new[last_active]) if last_active in new else None
        assert chain is not None and nests_user_code(chain["spans"]), (index, chain)
    assert seen == [f"root span {CHAIN_ROOT}"] * 3


# -- 3. the hardened class makes working tracers -----------------------------------------


def test_hardened_class_makes_tracers_that_record_as_bare(
    attach: Callable[[str, bool, bool], Attach],
) -> None:
    """``harden(MlflowLangchainTracer)`` then instances of it. MLflow's metaclass
    (``ExceptionSafeAbstractClass``) wraps every callable of a subclass body in a
    try/except that returns None, the hardened class's ``__new__`` included."""
    bare = record("invoke", attach("harden", False, False))
    assert_bare_is_sound(bare, "invoke", False)

    attached = attach("harden-class", False, True)
    assert isinstance(attached.explicit, MlflowLangchainTracer), attached.explicit
    hardened = record("invoke", attached)
    assert_same(comparable(bare), comparable(hardened), MLFLOW_VOLATILE)
