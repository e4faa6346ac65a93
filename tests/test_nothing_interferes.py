"""Guarantee 4, "nothing interferes": a hardened handler is the handler, and it keeps to
itself.

Same class for ``isinstance``, same state, its other methods, copies LangChain
makes of it, every hook its class understands, context set by its own hooks;
and LangChain's plumbing is never touched. One handler never delays another, deliveries
see the context of their emission, short-lived handlers do not leak threads or event
loops, and a forked child starts fresh.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import gc
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    CallbackManager,
    StdOutCallbackHandler,
)
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableGenerator, RunnableLambda

import safecallbacks
from safecallbacks import SafeHandler, harden, harden_config
from safecallbacks.testing import (
    AsyncRecordingHandler,
    RecordingHandler,
    assert_accounted,
    async_wait_until,
    fake_chat_model,
)
from tests._child import json_lines, run_child, run_reporting
from tests._imports import import_or_skip
from tests._support import (
    EVENTS,
    KINDS,
    PROBE,
    WORDS,
    blocker,
    check_complete,
    probe,
    recorder,
)

pytestmark = pytest.mark.timeout(60)

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


class PerRequest(BaseCallbackHandler):
    """Builds a fresh handler per request from one it holds: not a copy of itself."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def for_request(self) -> PerRequest:
        return type(self)()

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_a_handler_a_method_builds_fresh_is_its_own_not_its_makers_copy() -> None:
    maker = harden(PerRequest(), mode="offload")
    made = maker.for_request()
    assert type(made) is type(maker) and made.tokens == []
    safecallbacks.close(maker, 5.0)
    for _ in range(2):  # closing the maker must not close it: nothing is dropped
        list(fake_chat_model(5).stream("hi", config={"callbacks": [made]}))
    assert safecallbacks.flush(made, 5.0) and len(made.tokens) == 18
    made_stats, maker_stats = safecallbacks.stats(made), safecallbacks.stats(maker)
    assert (made_stats.closed, made_stats.delivered, made_stats.dropped) == (False, 18, 0)
    assert (maker_stats.emitted, maker_stats.delivered) == (0, 0)  # not counted as the maker's


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


async def _ainvoke_each_in_a_fresh_context(*handlers: Any) -> None:
    """One ``ainvoke`` of an identity chain per handler, each in a task with an empty context."""
    chain = RunnableLambda(lambda x: x)
    for handler in handlers:
        await asyncio.create_task(
            chain.ainvoke(1, config={"callbacks": [handler]}), context=contextvars.Context()
        )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(SetsContextAsyncInline, "entered at chain start"), (SetsContextAsync, None)],
    ids=["run_inline-awaited-in-caller", "gathered-in-own-task"],
)
async def test_inline_async_hooks_are_awaited_as_langchain_awaits_the_bare_handler(
    kind: type[SetsContextAsync], expected: str | None
) -> None:
    bare, hardened = kind(), harden(kind(), mode="inline")
    await _ainvoke_each_in_a_fresh_context(bare, hardened)
    assert hardened.seen == bare.seen == [expected]
    assert safecallbacks.stats(hardened).delivered == 2


class SetsContextSync(SetsContext):
    pass


async def test_inline_sync_hooks_on_the_async_path_keep_bare_context_semantics() -> None:
    # Bare, a sync handler runs in an executor with a copy of the context per event.
    bare, hardened = SetsContextSync(), harden(SetsContextSync(), mode="inline")
    await _ainvoke_each_in_a_fresh_context(bare, hardened)
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
    collector = harden(SlowCollector(gate), mode="offload", settle=0)
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


# --------------------------------------------------------------------------------------------
# Offloaded deliveries see the context variables of their emission
# --------------------------------------------------------------------------------------------

RUN_NAMES = ["alpha", "beta", "gamma"]


def check_context(seen: list[Any]) -> None:
    """Each event carries the context value its own run's emitter had."""
    assert len(seen) == EVENTS * len(RUN_NAMES)
    per_name: dict[Any, int] = {}
    for item in seen:
        (name,) = item.tags
        assert item.probe == name, item
        per_name[name] = per_name.get(name, 0) + 1
    assert per_name == dict.fromkeys(RUN_NAMES, EVENTS)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_handler_sees_context_of_emission(kind: str) -> None:
    handler = probe(kind)
    safe = harden(handler, breaker=None)
    model = fake_chat_model(WORDS, replies=len(RUN_NAMES))
    start = threading.Barrier(len(RUN_NAMES))
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            PROBE.set(name)  # in this thread's own context
            start.wait(10)
            for _ in model.stream("hi", config={"callbacks": [safe], "tags": [name]}):
                pass
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in RUN_NAMES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    PROBE.set("the flushing thread")  # must not leak into deliveries
    assert safe.flush(10)
    check_context(handler.seen)


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_handler_sees_context_of_emission(kind: str) -> None:
    handler = probe(kind)
    safe = harden(handler, breaker=None)
    model = fake_chat_model(WORDS, replies=len(RUN_NAMES))

    async def run(name: str) -> None:
        PROBE.set(name)  # each task has its own copy of the context
        async for _ in model.astream("hi", config={"callbacks": [safe], "tags": [name]}):
            await asyncio.sleep(0)  # interleave the runs

    await asyncio.gather(*(run(name) for name in RUN_NAMES))
    PROBE.set("the flushing task")
    assert await safe.aflush(10)
    check_context(handler.seen)


class TickHandler(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.seen.append((data, PROBE.get()))


class AsyncTickHandler(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.seen.append((data, PROBE.get()))


def ticking() -> RunnableGenerator:
    """A runnable that changes the context variable before each event it emits."""

    def gen(inputs: Iterator[Any]) -> Iterator[int]:
        for _ in inputs:
            pass
        for i in range(30):
            PROBE.set(i)
            dispatch_custom_event("tick", i)
            yield i

    async def agen(inputs: AsyncIterator[Any]) -> AsyncIterator[int]:
        async for _ in inputs:
            pass
        for i in range(30):
            PROBE.set(i)
            await adispatch_custom_event("tick", i)
            yield i

    return RunnableGenerator(gen, agen)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_context_is_captured_per_event(kind: str) -> None:
    handler = TickHandler() if kind == "sync" else AsyncTickHandler()
    safe = harden(handler, breaker=None)
    assert list(ticking().stream("go", config={"callbacks": [safe]})) == list(range(30))
    assert safe.flush(10)
    assert handler.seen == [(i, i) for i in range(30)]


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_context_is_captured_per_event(kind: str) -> None:
    handler = TickHandler() if kind == "sync" else AsyncTickHandler()
    safe = harden(handler, breaker=None)
    got = [i async for i in ticking().astream("go", config={"callbacks": [safe]})]
    assert got == list(range(30))
    assert await safe.aflush(10)
    assert handler.seen == [(i, i) for i in range(30)]


# --------------------------------------------------------------------------------------------
# One handler never delays another
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hung", KINDS)
@pytest.mark.parametrize("other", KINDS)
def test_stream_hung_handler_does_not_delay_another(
    hung: str, other: str, releases: list[Any]
) -> None:
    stuck = blocker(hung, after=0)
    releases.append(stuck)
    witness = recorder(other)
    safe_stuck, safe_witness = harden(stuck), harden(witness)
    config = {"callbacks": [safe_stuck, safe_witness]}
    chunks = [str(c.content) for c in fake_chat_model(WORDS).stream("hi", config=config)]
    assert stuck.entered.wait(10)
    assert safe_witness.flush(3), safe_witness.stats()
    assert not stuck.gate.is_set()
    check_complete(witness, chunks)
    assert not safe_stuck.flush(0.05)  # it really is still hung
    stuck.release()
    assert safe_stuck.flush(10)
    check_complete(stuck, chunks)


@pytest.mark.parametrize("hung", KINDS)
@pytest.mark.parametrize("other", KINDS)
async def test_astream_hung_handler_does_not_delay_another(
    hung: str, other: str, releases: list[Any]
) -> None:
    stuck = blocker(hung, after=0)
    releases.append(stuck)
    witness = recorder(other)
    safe_stuck, safe_witness = harden(stuck), harden(witness)
    config = {"callbacks": [safe_stuck, safe_witness]}
    chunks = [str(c.content) async for c in fake_chat_model(WORDS).astream("hi", config=config)]
    assert await async_wait_until(stuck.entered.is_set, 10)
    assert await safe_witness.aflush(3), safe_witness.stats()
    assert not stuck.gate.is_set()
    check_complete(witness, chunks)
    assert not await safe_stuck.aflush(0.05)
    stuck.release()
    assert await safe_stuck.aflush(10)
    check_complete(stuck, chunks)


FRESH_POOL_SCRIPT = """
import os, sys, threading
from langchain_core.callbacks import BaseCallbackHandler
from safecallbacks import harden
from safecallbacks.testing import RecordingHandler, fake_chat_model

class TokenSink(BaseCallbackHandler):
    # Hangs on its first event: the first time its lane is kicked, a worker gets stuck.
    def __init__(self):
        self.gate, self.entered = threading.Event(), threading.Event()

    def on_llm_new_token(self, token, **kwargs):
        self.entered.set()
        self.gate.wait()

def child(scenario):
    stuck, witness = TokenSink(), RecordingHandler()
    safe_stuck, safe_witness = harden(stuck), harden(witness)
    if scenario == "one stream, witness first":
        runs = [[safe_witness, safe_stuck]]
    elif scenario == "one stream, hung first":
        runs = [[safe_stuck, safe_witness]]
    else:  # "witness, then hung, then witness again": one request after the other
        runs = [[safe_witness], [safe_stuck], [safe_witness]]
    model = fake_chat_model(3, replies=len(runs))
    for callbacks in runs:
        for _ in model.stream("hi", config={"callbacks": callbacks}):
            pass
        if safe_stuck in callbacks and not stuck.entered.wait(10):
            return 3
    if not safe_witness.flush(2.0):
        return 1
    return 0 if len(witness.calls) == 7 * sum(safe_witness in r for r in runs) else 2

SCENARIOS = ["one stream, witness first", "one stream, hung first",
             "witness, then hung, then witness again"]
for round in range(int(sys.argv[1])):
    scenario = SCENARIOS[round % 3]
    pid = os.fork()
    if pid == 0:
        os._exit(child(scenario))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"round {round} ({scenario}): child exited {code} (1: the witness was starved)")
        sys.exit(1)
print("ok")
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_hung_handler_does_not_starve_another_in_a_fresh_pool(tmp_path: Path) -> None:
    """Each round runs in a forked child, so it starts with an empty worker pool.

    The first deliveries of a process are where the pool has the fewest workers: the one
    that picks up the hung handler must not leave the other handler's lane unattended.
    """
    run_child(tmp_path, FRESH_POOL_SCRIPT, "30", timeout=120, name="fresh_pool.py")


# --------------------------------------------------------------------------------------------
# One hardened handler per request: a thousand of them must not mean a thousand threads.
#
# Runs in a child interpreter with SAFECALLBACKS_WORKER_IDLE=0.2 (read when the worker pool
# is created), so idle workers leave quickly and "back to baseline" is observable in a
# bounded wait. The script counts every Thread.start() in the process and samples
# threading.active_count() while the requests run.
# --------------------------------------------------------------------------------------------

REQUESTS = 1_000

PER_REQUEST_SCRIPT = """
import asyncio, json, sys, threading, time

STARTED = []
_start = threading.Thread.start

def counting_start(self):
    STARTED.append(self.name)
    _start(self)

threading.Thread.start = counting_start

from safecallbacks import harden
from safecallbacks.testing import (
    AsyncRecordingHandler, RecordingHandler, fake_chat_model, wait_until, worker_threads)

MODE, REQUESTS = sys.argv[1], int(sys.argv[2])
WORDS = 3  # five chunks, seven events per request
baseline = threading.active_count()
peak = [baseline]
lib_peak = [0]
done = threading.Event()

def note():
    peak[0] = max(peak[0], threading.active_count())
    ours = sum(t.name.startswith("safecallbacks") for t in threading.enumerate())
    lib_peak[0] = max(lib_peak[0], ours)

def sample():
    while not done.is_set():
        note()
        done.wait(0.002)

sampler = threading.Thread(target=sample, name="sampler")
sampler.start()
baseline_with_sampler = baseline + 1
bad = []

def request(model):
    handler = RecordingHandler()
    with harden(handler) as safe:
        for _ in model.stream("hi", config={"callbacks": [safe]}):
            pass
        note()
    if len(handler.calls) != 7 or safe.stats().pending:
        bad.append(safe.stats().pending)

async def arequest(model):
    handler, ahandler = RecordingHandler(), AsyncRecordingHandler()
    async with harden(handler) as safe, harden(ahandler) as asafe:
        async for _ in model.astream("hi", config={"callbacks": [safe, asafe]}):
            pass
    if len(handler.calls) != 7 or len(ahandler.calls) != 7:
        bad.append((len(handler.calls), len(ahandler.calls)))

if MODE == "sequential":
    model = fake_chat_model(WORDS, replies=REQUESTS)
    for _ in range(REQUESTS):
        request(model)
elif MODE == "threads":
    model = fake_chat_model(WORDS, replies=REQUESTS)
    def serve(count):
        for _ in range(count):
            request(model)
    servers = [threading.Thread(target=serve, args=(REQUESTS // 8,), name=f"server-{i}")
               for i in range(8)]
    for server in servers:
        server.start()
    for server in servers:
        server.join(120)
elif MODE == "asyncio":
    model = fake_chat_model(WORDS, replies=REQUESTS)
    async def main():
        for first in range(0, REQUESTS, 50):
            await asyncio.gather(*(arequest(model) for _ in range(50)))
    asyncio.run(main())

note()
workers_at_end = worker_threads()
ended = wait_until(
    lambda: worker_threads() == 0 and threading.active_count() == baseline_with_sampler,
    timeout=15.0,
)
done.set()
sampler.join(5)
print(json.dumps({
    "bad": bad[:5],
    "bad_count": len(bad),
    "baseline": baseline,
    "peak_extra": peak[0] - baseline_with_sampler,
    "lib_peak": lib_peak[0],
    "started": [name for name in STARTED if name.startswith("safecallbacks")],
    "others_started": sorted({name for name in STARTED if not name.startswith("safecallbacks")}),
    "workers_at_end": workers_at_end,
    "back_to_baseline": ended,
    "left": [t.name for t in threading.enumerate()],
}))
"""


def run_per_request(directory: Path, mode: str) -> dict[str, Any]:
    done = run_child(
        directory,
        PER_REQUEST_SCRIPT,
        mode,
        str(REQUESTS),
        env={"SAFECALLBACKS_WORKER_IDLE": "0.2"},
        timeout=150,
        name=f"per_request_handlers_{mode}.py",
    )
    result: dict[str, Any] = json_lines(done)[-1]
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """One child run per mode, shared by the tests that look at it."""
    directory = tmp_path_factory.mktemp("threads")
    cache: dict[str, dict[str, Any]] = {}

    def get(mode: str) -> dict[str, Any]:
        if mode not in cache:
            cache[mode] = run_per_request(directory, mode)
        return cache[mode]

    return get


# Extra threads the script's own machinery runs at the same time: 8 request-serving threads
# in "threads" mode; asyncio's default executor (at most min(32, cpus + 4)) in "asyncio" mode,
# which LangChain uses to iterate GenericFakeChatModel's sync stream, plus the thread
# asyncio.run starts to shut that executor down.
OTHERS = {"sequential": 0, "threads": 8, "asyncio": min(32, (os.cpu_count() or 1) + 4) + 1}


FEW = 32  # "far fewer than one per request": a few dozen at the very most
# Over the whole run: the child lets idle workers go after 0.2 s, so bursts separated by a
# quiet moment may start new ones; still at most a few percent of the 1,000 requests.
STARTED_AT_MOST = 64


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["sequential", "threads", "asyncio"])
def test_a_thousand_short_lived_handlers_share_a_few_threads(
    results: Callable[[str], dict[str, Any]], mode: str
) -> None:
    """1,000 requests, each with its own hardened handler, one at a time ("sequential"),
    from 8 server threads ("threads") or 50 at a time on one event loop ("asyncio").

    Every delivery takes microseconds and nothing is blocked, so a few workers keep up;
    the pool must neither start a worker per request nor one per concurrent request.
    """
    result = results(mode)
    assert result["bad_count"] == 0, result["bad"]
    started = result["started"]
    assert len(started) <= STARTED_AT_MOST, f"{len(started)} workers started: {started[-5:]}"
    assert result["lib_peak"] <= FEW, result  # threads alive at the same time
    assert result["peak_extra"] <= result["lib_peak"] + OTHERS[mode], result
    if mode == "sequential":
        # One request at a time: a couple of workers do all the work.
        assert len(started) <= 4, started
    # And once the requests are over, the idle workers leave: nothing is left behind.
    assert result["back_to_baseline"], result["left"]


# --------------------------------------------------------------------------------------------
# Closed event loops are let go
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_closed_loops_are_not_kept_alive_by_a_shared_handler() -> None:
    """One asyncio.run per request with a module-level handler must not accumulate loops."""
    safe = harden(AsyncRecordingHandler())
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def request() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async for _ in fake_chat_model(2).astream("hi", config={"callbacks": [safe]}):
            pass
        assert await safe.aflush(10)

    for _ in range(50):
        asyncio.run(request())
    gc.collect()
    alive = sum(ref() is not None for ref in loops)
    assert alive <= 1, f"{alive} closed event loops are still referenced"
    assert_accounted(safe.stats())


# --------------------------------------------------------------------------------------------
# os.fork(): the child starts fresh, the parent carries on (child interpreters, so a fork
# never copies pytest's own threads)
# --------------------------------------------------------------------------------------------

FORK = """
from safecallbacks.testing import AsyncRecordingHandler, RecordingHandler, worker_threads

PARENT = os.getpid()

class ParentOnlyHang(RecordingHandler):
    # Hangs on every token, but only in the parent process.
    def __init__(self):
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()

    def on_llm_new_token(self, *args, **kwargs):
        if os.getpid() == PARENT:
            self.entered.set()
            self.gate.wait()
        self.record("on_llm_new_token", args, kwargs)

handlers = {"sync": RecordingHandler(), "async": AsyncRecordingHandler(), "hang": ParentOnlyHang()}
safes = {name: harden(h, breaker=None) for name, h in handlers.items()}
config = {"callbacks": list(safes.values())}
calm = {"callbacks": [safes["sync"], safes["async"]]}
model = fake_chat_model(5, replies=5)  # 9 chunks, 11 events per stream
# The hung handler first, so that it has a worker of its own before the others start.
for _ in model.stream("hi", config={"callbacks": [safes["hang"]]}):
    pass
assert handlers["hang"].entered.wait(10)
for _ in model.stream("hi", config=calm):
    pass
assert safes["sync"].flush(10) and safes["async"].flush(10)

read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    out = {"fresh": {n: summary(s.stats()) for n, s in safes.items()},
           "workers_at_start": worker_threads(),
           "calls_at_start": {n: len(h.calls) for n, h in handlers.items()}}
    for _ in model.stream("hi", config=config):
        pass
    out["flushed"] = {n: s.flush(10) for n, s in safes.items()}
    out["after"] = {n: summary(s.stats()) for n, s in safes.items()}
    out["calls_after"] = {n: len(h.calls) for n, h in handlers.items()}
    os.write(write_end, json.dumps(out).encode())
    os.close(write_end)
    os._exit(0)

os.close(write_end)
data = b""
while True:
    chunk = os.read(read_end, 65536)
    if not chunk:
        break
    data += chunk
_, status = os.waitpid(pid, 0)
RESULT["child_exit"] = os.waitstatus_to_exitcode(status)
RESULT["child"] = json.loads(data or b"{}")
for _ in model.stream("hi", config=calm):
    pass
for _ in model.stream("hi", config={"callbacks": [safes["hang"]]}):
    pass
RESULT["parent_flushed"] = {n: safes[n].flush(10) for n in ("sync", "async")}
RESULT["parent"] = {n: summary(s.stats()) for n, s in safes.items()}
handlers["hang"].gate.set()
RESULT["parent_hang_flushed"] = safes["hang"].flush(10)
RESULT["parent_after_release"] = summary(safes["hang"].stats())
RESULT["main_done"] = time.monotonic()
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_fresh_and_parent_carries_on(tmp_path: Path) -> None:
    result = run_reporting(tmp_path, FORK)
    per_stream = 11
    assert result["child_exit"] == 0, result
    child = result["child"]
    for name in ("sync", "async", "hang"):
        fresh = child["fresh"][name]
        assert fresh["emitted"] == fresh["delivered"] == fresh["pending"] == 0, child
        assert fresh["dropped"] == 0
        assert child["flushed"][name] is True, child
        after = child["after"][name]
        assert after["emitted"] == after["delivered"] == per_stream, child
        assert after["pending"] == 0
    assert child["workers_at_start"] == 0
    # The handlers' own memory was copied by fork; the child added exactly its own events.
    for name in ("sync", "async"):
        assert child["calls_after"][name] - child["calls_at_start"][name] == per_stream
    # The hung handler's queue in the parent was not replayed in the child.
    assert child["calls_after"]["hang"] - child["calls_at_start"]["hang"] == per_stream

    parent = result["parent"]
    for name in ("sync", "async"):
        assert result["parent_flushed"][name] is True
        assert parent[name]["emitted"] == parent[name]["delivered"] == 2 * per_stream
    assert result["parent_hang_flushed"] is True
    released = result["parent_after_release"]
    assert released["emitted"] == released["delivered"] == 2 * per_stream


FORK_WHILE_LOCKED = """
import safecallbacks
from safecallbacks import (
    _classes, _hardened, _install, _lifecycle, _loops, _metrics, _policy, _wakeups, _workers,
)
from safecallbacks.testing import RecordingHandler

held, release = threading.Event(), threading.Event()
LOCKS = {
    "engine": lambda: _hardened.ENGINE_LOCK,
    "classes": lambda: _classes._classes_lock,
    "install": lambda: _install._lock,
    "policy": lambda: _policy._lock,
    "instruments": lambda: _metrics._instruments_lock,
    "pool": lambda: _workers._POOL_LOCK,
    "background loop": lambda: _loops._BACKGROUND_LOCK,
    "registry": lambda: _lifecycle.registry._lock,
    "wakeups": lambda: _wakeups._lock,
}

def hold_every_lock():
    for get in LOCKS.values():
        get().acquire()
    held.set()
    release.wait()
    for get in LOCKS.values():
        get().release()

threading.Thread(target=hold_every_lock, daemon=True).start()
assert held.wait(10)
pid = os.fork()
if pid == 0:
    # The child must be able to do everything that takes those locks.
    class Fresh(RecordingHandler):
        pass
    handler = harden(Fresh(), mode="offload")
    safecallbacks.register_inline("some.module.Tracer")
    safecallbacks.install()
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    ok = handler.flush(10)
    safecallbacks.uninstall()
    import asyncio
    loop = asyncio.new_event_loop()
    woken = loop.create_future()
    _wakeups.call_soon_from_thread(loop, lambda: woken.set_result(True))
    ok = ok and loop.run_until_complete(asyncio.wait_for(woken, 10))
    os._exit(0 if ok and len(handler.calls) == 7 else 3)
release.set()
deadline = time.monotonic() + 20
status = None
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
RESULT["child_exit"] = os.waitstatus_to_exitcode(status) if done else "hung"
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_holds_a_package_lock_leaves_the_child_working(
    tmp_path: Path,
) -> None:
    result = run_reporting(tmp_path, FORK_WHILE_LOCKED)
    assert result["child_exit"] == 0, result


class SeesLater(BaseCallbackHandler):
    """Reads the first chunk only once the consumer has had it (docs: by reference)."""

    def __init__(self) -> None:
        self.mutated = threading.Event()
        self.seen: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if not self.seen:
            self.mutated.wait(5.0)
        self.seen.append(str(kwargs["chunk"].message.content))


def test_an_offloaded_handler_receives_payloads_by_reference_as_the_readme_says() -> None:
    handler = harden(SeesLater(), mode="offload")
    for index, message in enumerate(
        fake_chat_model(3).stream("hi", config={"callbacks": [handler]})
    ):
        if index == 0:
            message.content = "changed by the consumer"
            handler.mutated.set()
    assert safecallbacks.flush(handler, 5.0)
    assert handler.seen[0] == "changed by the consumer"
