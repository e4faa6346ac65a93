"""Guarantee 4, "nothing interferes": a hardened handler is the handler.

Same class for ``isinstance``, same state, its other methods, copies LangChain
makes of it, every hook its class understands, context set by its own hooks;
and LangChain's plumbing is never touched.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import threading
from typing import Any

import pytest
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    CallbackManager,
    StdOutCallbackHandler,
)
from langchain_core.runnables import RunnableLambda

import safecallbacks
from safecallbacks import SafeHandler, harden, harden_config
from safecallbacks.testing import RecordingHandler, fake_chat_model
from tests._imports import import_or_skip

CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("sc_test_ctx", default=None)


class Counting(BaseCallbackHandler):
    """A handler with its own state and a method of its own that is not a hook."""

    def __init__(self) -> None:
        self.starts = 0
        self.tokens: list[str] = []

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_my_own_thing(self) -> str:  # named like a hook, but no framework calls it
        return "called directly"

    def total(self) -> int:
        return self.starts + len(self.tokens)


def test_harden_returns_the_handler_itself_with_its_class_state_and_methods() -> None:
    handler = Counting()
    handler.starts = 5
    hardened = harden(handler)
    assert hardened is handler
    assert isinstance(hardened, Counting) and isinstance(hardened, BaseCallbackHandler)
    assert type(hardened).__name__ == "Counting" and type(hardened) is not Counting
    assert hardened.starts == 5  # reads its own state
    hardened.starts = 7  # and writes it
    assert vars(handler)["starts"] == 7
    assert hardened.total() == 7
    assert hardened.on_my_own_thing() == "called directly"  # not a hook: untouched
    assert hardened.raise_error is False and hardened.run_inline is True


def test_a_hardened_handler_records_exactly_what_the_bare_one_records() -> None:
    bare, hardened = Counting(), harden(Counting())
    for handler in (bare, hardened):
        chain = RunnableLambda(lambda text: text) | fake_chat_model(12)
        list(chain.stream("hi", config={"callbacks": [handler]}))
    assert safecallbacks.flush(hardened, 5.0)
    assert (hardened.starts, hardened.tokens) == (bare.starts, bare.tokens)
    assert bare.tokens, "the scenario must produce tokens"


def test_langchains_isinstance_deduplication_sees_the_hardened_handler() -> None:
    printer = harden(StdOutCallbackHandler())
    manager = CallbackManager.configure(inheritable_callbacks=[printer], verbose=True)
    printers = [h for h in manager.handlers if isinstance(h, StdOutCallbackHandler)]
    assert printers == [printer]


def test_hardening_twice_is_one_hardening_and_other_options_are_refused() -> None:
    handler = harden(RecordingHandler(), max_queue=10)
    assert harden(handler) is handler
    assert harden_config({"callbacks": [handler]})["callbacks"] == [handler]
    with pytest.raises(ValueError, match="already hardened with other options"):
        harden(handler, max_queue=11)
    assert safecallbacks.stats(handler).mode == "offload"


def test_harden_none_is_a_type_error_not_a_decorator() -> None:
    with pytest.raises(TypeError, match="expects a LangChain callback handler"):
        harden(None)


class Exporter(BaseCallbackHandler):
    """A handler with its own flush/close/stats, as exporters have."""

    def __init__(self) -> None:
        self.flushed = self.closed = 0
        self.ends: list[Any] = []

    def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
        self.ends.append(outputs)

    def flush(self) -> str:
        self.flushed += 1
        return "exporter flushed"

    def close(self) -> None:
        self.closed += 1

    def stats(self) -> dict[str, int]:
        return {"ends": len(self.ends)}


def test_the_handlers_own_methods_win_and_module_level_controls_always_work() -> None:
    exporter = harden(Exporter(), mode="offload")
    RunnableLambda(lambda x: x * 2).invoke(21, config={"callbacks": [exporter]})
    assert safecallbacks.flush(exporter, 5.0)
    assert exporter.ends == [42]
    assert exporter.flush() == "exporter flushed" and exporter.flushed == 1
    assert exporter.stats() == {"ends": 1}
    assert safecallbacks.stats(exporter).delivered == 1
    assert safecallbacks.close(exporter, 5.0) and exporter.closed == 0
    assert safecallbacks.stats(exporter).closed


def test_module_level_controls_name_what_they_need() -> None:
    with pytest.raises(TypeError, match=r"safecallbacks.flush\(\) expects a hardened handler"):
        safecallbacks.flush(Counting())


# --- copies ----------------------------------------------------------------------


def test_copies_are_hardened_and_the_original_covers_them() -> None:
    original = harden(Counting(), mode="offload")
    shallow = copy.copy(original)
    deep = copy.deepcopy(original)
    chain = RunnableLambda(lambda x: x)
    for handler in (shallow, deep, original):
        chain.invoke(1, config={"callbacks": [handler]})
    assert safecallbacks.flush(original, 5.0)  # flushing the original settles the copies
    assert (original.starts, shallow.starts, deep.starts) == (1, 1, 1)
    assert safecallbacks.stats(original).delivered == 3
    assert safecallbacks.stats(shallow).delivered == 1


class MetadataCopier(BaseCallbackHandler):
    """Makes copies of itself the way LangChainTracer.copy_with_metadata_defaults does."""

    def __init__(self, tags: list[str] | None = None) -> None:
        self.tags = tags or []
        self.seen: list[str] = []

    def copy_with_tags(self, tags: list[str]) -> MetadataCopier:
        return self.__class__(tags=self.tags + tags)

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        self.seen.append(",".join(self.tags))


def test_a_copy_made_by_the_handlers_own_method_is_hardened_and_joins_its_family() -> None:
    original = harden(MetadataCopier(), mode="offload", max_queue=33)
    child = original.copy_with_tags(["child"])
    assert isinstance(child, safecallbacks.SafeHandler) is False
    assert type(child) is type(original) and child is not original
    assert safecallbacks.stats(child).mode == "offload"
    RunnableLambda(lambda x: x).invoke(1, config={"callbacks": [child]})
    assert safecallbacks.flush(original, 5.0)
    assert child.seen == ["child"] and original.seen == []
    assert safecallbacks.stats(original).delivered == 1


def test_langchain_tracer_copies_stay_hardened() -> None:
    from langchain_core.tracers import LangChainTracer
    from langsmith import Client

    if not hasattr(LangChainTracer, "copy_with_metadata_defaults"):
        pytest.skip("LangChainTracer copies itself from langchain-core 1.x on")
    client = Client(api_url="http://127.0.0.1:9", api_key="unused", info={})
    tracer = harden(LangChainTracer(client=client, project_name="p"))
    copied = tracer.copy_with_metadata_defaults(metadata={"k": "v"}, tags=["t"])
    assert isinstance(copied, LangChainTracer) and type(copied) is type(tracer)
    assert safecallbacks.stats(copied).mode == "inline"
    assert copied.tracing_metadata == {"k": "v"} and copied.tags == ["t"]


# --- every hook the class understands ------------------------------------------------


def test_a_frameworks_extra_hooks_are_hardened_and_user_methods_are_not() -> None:
    graph_callbacks = import_or_skip("langgraph.callbacks")

    class Graph(graph_callbacks.GraphCallbackHandler):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_interrupt(self, event: Any) -> None:
            self.events.append("interrupt")
            raise RuntimeError("a failing interrupt hook")

        def on_resume(self, event: Any) -> None:
            self.events.append("resume")

    handler = harden(Graph(), mode="inline")
    assert {"on_interrupt", "on_resume"} <= set(type(handler)._sc_resolved)
    assert "on_my_own_thing" not in type(harden(Counting()))._sc_resolved
    handler.on_interrupt(object())  # as LangGraph's manager calls it: never raises
    handler.on_resume(object())
    stats = safecallbacks.stats(handler)
    assert handler.events == ["interrupt", "resume"]
    assert (stats.delivered, stats.failed, dict(stats.errors)) == (1, 1, {"RuntimeError": 1})


class MixedIn(SafeHandler, StdOutCallbackHandler):
    pass


def test_safe_handler_mixed_with_a_handler_class_hardens_inherited_hooks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = MixedIn()
    RunnableLambda(lambda x: x).invoke(1, config={"callbacks": [handler]})
    stats = safecallbacks.stats(handler)
    assert stats.mode == "inline" and stats.emitted == stats.delivered == 2
    assert "Entering new" in capsys.readouterr().out


# --- inline delivery in the caller's own context ----------------------------------


class SetsContext(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        CONTEXT.set("entered at chain start")

    def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        self.seen.append(CONTEXT.get())


class SetsContextAsync(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        CONTEXT.set("entered at chain start")

    async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        self.seen.append(CONTEXT.get())


def _run_in_fresh_context(fn: Any) -> Any:
    return contextvars.Context().run(fn)


def test_inline_sync_hooks_run_in_the_callers_context_as_bare() -> None:
    chain = RunnableLambda(lambda x: x)
    bare, hardened = SetsContext(), harden(SetsContext(), mode="inline")
    for handler in (bare, hardened):
        _run_in_fresh_context(lambda h=handler: chain.invoke(1, config={"callbacks": [h]}))
    assert hardened.seen == bare.seen == ["entered at chain start"]


class SetsContextAsyncInline(SetsContextAsync):
    run_inline = True  # LangChain awaits these in the caller's task, one after another


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(SetsContextAsyncInline, "entered at chain start"), (SetsContextAsync, None)],
    ids=["run_inline-awaited-in-caller", "gathered-in-own-task"],
)
async def test_inline_async_hooks_are_awaited_as_langchain_awaits_the_bare_handler(
    kind: type[SetsContextAsync], expected: str | None
) -> None:
    chain = RunnableLambda(lambda x: x)
    bare, hardened = kind(), harden(kind(), mode="inline")
    for handler in (bare, hardened):
        await asyncio.create_task(
            chain.ainvoke(1, config={"callbacks": [handler]}), context=contextvars.Context()
        )
    assert hardened.seen == bare.seen == [expected]
    assert safecallbacks.stats(hardened).delivered == 2


class SetsContextSync(SetsContext):
    pass


async def test_inline_sync_hooks_on_the_async_path_keep_bare_context_semantics() -> None:
    # Bare, a sync handler runs in an executor with a copy of the context per event.
    chain = RunnableLambda(lambda x: x)
    bare, hardened = SetsContextSync(), harden(SetsContextSync(), mode="inline")
    for handler in (bare, hardened):
        await asyncio.create_task(
            chain.ainvoke(1, config={"callbacks": [handler]}), context=contextvars.Context()
        )
    assert hardened.seen == bare.seen == [None]


async def test_inline_async_hooks_from_sync_code_make_no_loop_per_event() -> None:
    handler = harden(SetsContextAsync(), mode="inline")
    loops_before = threading.active_count()
    await asyncio.to_thread(RunnableLambda(lambda x: x).invoke, 1, {"callbacks": [handler]})
    assert safecallbacks.stats(handler).delivered == 2
    assert threading.active_count() <= loops_before + 2  # the shared background loop at most


# --- results complete when the call returns (settle) --------------------------------


class SlowCollector(BaseCallbackHandler):
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.tokens: list[str] = []
        self.gate = gate

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        self.tokens.append(token)


def test_settle_completes_an_offloaded_collector_before_stream_returns() -> None:
    gate = threading.Event()
    collector = harden(SlowCollector(gate), mode="offload", settle=5.0)
    timer = threading.Timer(0.2, gate.set)  # deliveries are held until the stream has ended
    timer.start()
    chunks = list(fake_chat_model(20).stream("hi", config={"callbacks": [collector]}))
    timer.join()
    assert len(collector.tokens) == len(chunks)


async def test_settle_completes_an_offloaded_collector_before_ainvoke_returns() -> None:
    gate = threading.Event()
    collector = harden(SlowCollector(gate), mode="offload", settle=5.0)
    asyncio.get_running_loop().call_later(0.2, gate.set)
    chunks = [c async for c in fake_chat_model(20).astream("hi", {"callbacks": [collector]})]
    assert len(collector.tokens) == len(chunks)


def test_without_settle_the_stream_does_not_wait_for_the_collector() -> None:
    gate = threading.Event()
    collector = harden(SlowCollector(gate), mode="offload")
    try:
        chunks = list(fake_chat_model(20).stream("hi", config={"callbacks": [collector]}))
        assert len(collector.tokens) < len(chunks)  # held back: proves settle is what waits
    finally:
        gate.set()
    assert safecallbacks.flush(collector, 5.0)


def test_settle_skips_a_stuck_handler_within_its_deadline() -> None:
    gate = threading.Event()
    collector = harden(SlowCollector(gate), mode="offload", settle=0.3, stall_threshold=0.05)
    try:
        chunks = list(fake_chat_model(5).stream("hi", config={"callbacks": [collector]}))
        assert chunks and not collector.tokens
    finally:
        gate.set()
    assert safecallbacks.flush(collector, 5.0)


# --- plumbing is left alone ---------------------------------------------------------


def _plumbing_handlers() -> list[BaseCallbackHandler]:
    from langchain_core.tracers.log_stream import LogStreamCallbackHandler
    from langchain_core.tracers.root_listeners import RootListenersTracer

    found: list[BaseCallbackHandler] = [
        LogStreamCallbackHandler(),
        RootListenersTracer(config={}, on_start=None, on_end=None, on_error=None),
    ]
    try:
        from langchain_core.tracers.event_stream import _AstreamEventsCallbackHandler
    except ImportError:  # pragma: no cover
        pass
    else:
        found.append(_AstreamEventsCallbackHandler())
    return found


async def test_langchains_own_plumbing_is_never_hardened() -> None:
    for handler in _plumbing_handlers():
        kind = type(handler)
        assert harden_config({"callbacks": [handler]})["callbacks"] == [handler]
        assert type(handler) is kind
        with pytest.raises(TypeError, match="cannot be hardened"):
            harden(handler)


def test_langgraph_idle_timeout_handler_is_plumbing() -> None:
    retry = import_or_skip("langgraph.pregel._retry")
    assert safecallbacks._policy.is_plumbing(retry._IdleProgressCallbackHandler)


def test_register_plumbing_and_register_inline_extend_the_rules() -> None:
    class MyPlumbing(BaseCallbackHandler):
        def on_chain_start(self, *args: Any, **kwargs: Any) -> None: ...

    class MyCollector(BaseCallbackHandler):
        def on_chain_start(self, *args: Any, **kwargs: Any) -> None: ...

    safecallbacks.register_plumbing(MyPlumbing)
    safecallbacks.register_inline(f"{MyCollector.__module__}.{MyCollector.__qualname__}")
    plumbing = MyPlumbing()
    assert harden_config({"callbacks": [plumbing]})["callbacks"][0] is plumbing
    assert type(plumbing) is MyPlumbing
    assert safecallbacks.stats(harden(MyCollector())).mode == "inline"
    with pytest.raises(TypeError, match="handler classes or dotted class names"):
        safecallbacks.register_inline(42)  # type: ignore[arg-type]
