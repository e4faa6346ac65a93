"""``mode="auto"`` is right for handlers it has never seen, and what it picks holds its promises.

The rule is read from what a handler is (its bases, where its hooks' code lives, whether a
hook publishes context) and revised by what it does in its first events (a stall moves it
off the token path; context writes or thread-bound failures bring it into the caller).
Whatever it picks, an offloaded handler that keeps up is complete when the call returns.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextvars import ContextVar, copy_context
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableLambda

import safecallbacks
from safecallbacks import harden
from safecallbacks._adapt import PROBED_DELIVERIES, THREAD_TRIAL_AFTER
from safecallbacks._policy import decide
from safecallbacks.testing import fake_chat_model

# --- complete when the call returns (settle, on by default) ---------------------------


class TokenCounter(BaseCallbackHandler):
    """An application's usage collector, read right after each call; a little slow."""

    def __init__(self) -> None:
        self.chars = 0
        self.calls = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        time.sleep(0.002)  # a write somewhere: the backlog is still there at the run's end

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        time.sleep(0.02)
        self.chars += len(response.generations[0][0].text)
        self.calls += 1


class AsyncTokenCounter(AsyncCallbackHandler):
    """The same collector written with async hooks (delivered on the emitting loop)."""

    def __init__(self) -> None:
        self.chars = 0
        self.calls = 0

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        await asyncio.sleep(0.002)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.02)
        self.chars += len(response.generations[0][0].text)
        self.calls += 1


def _consume(api: str, model: Any, config: dict[str, Any]) -> None:
    if api == "invoke":
        model.invoke("hi", config=config)
    elif api == "stream":
        list(model.stream("hi", config=config))
    elif api == "batch":
        model.batch(["hi"], config=config)
    elif api == "ainvoke":
        asyncio.run(model.ainvoke("hi", config=config))
    else:

        async def drain() -> None:
            async for _ in model.astream("hi", config=config):
                pass

        asyncio.run(drain())


@pytest.mark.parametrize("api", ["invoke", "stream", "batch", "ainvoke", "astream"])
@pytest.mark.parametrize("attach", ["harden", "install"])
@pytest.mark.parametrize("kind", [TokenCounter, AsyncTokenCounter], ids=["sync", "async"])
def test_an_offloaded_collector_is_complete_when_each_call_returns(
    api: str, attach: str, kind: type[Any]
) -> None:
    counter = kind()
    handler = harden(counter) if attach == "harden" else counter
    if attach == "install":
        safecallbacks.install()
    try:
        model = fake_chat_model(10, replies=3)
        per_call = []
        for _ in range(3):
            _consume(api, model, {"callbacks": [handler]})
            per_call.append((counter.chars, counter.calls))  # no flush: read as users do
        assert safecallbacks.stats(handler).mode == "offload"
        chars = per_call[0][0]
        assert chars > 0 and per_call == [(chars * n, n) for n in (1, 2, 3)]
    finally:
        if attach == "install":
            safecallbacks.uninstall()


class Gated(BaseCallbackHandler):
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.gate.wait(10)
        self.tokens.append(token)


def _timed_stream(handler: Any) -> tuple[float, float]:
    """Seconds to the last chunk, and from the last chunk to the call's return."""
    started = time.monotonic()
    last = started
    for _ in fake_chat_model(10).stream("hi", config={"callbacks": [handler]}):
        last = time.monotonic()
    return last - started, time.monotonic() - last


def test_a_hung_handler_costs_settle_once_after_the_last_chunk() -> None:
    gate = threading.Event()
    handler = harden(Gated(gate), settle=0.5)  # stall_threshold 1 s: not yet "stuck"
    try:
        to_last, after_last = _timed_stream(handler)
        assert to_last < 0.4  # never mid-stream
        assert 0.4 <= after_last < 3.0  # the bound, once, after the last chunk
        _, again = _timed_stream(handler)
        assert again < 0.3  # the same hung delivery never costs a second wait
        assert not handler.tokens
    finally:
        gate.set()
    assert safecallbacks.flush(handler, 5.0)


class ChainInEnd(BaseCallbackHandler):
    """Runs a chain of its own, with itself attached, when a model run ends."""

    def __init__(self) -> None:
        self.nested_seconds: list[float] = []

    def on_llm_end(self, response: Any, *, parent_run_id: UUID | None = None, **kw: Any) -> None:
        if parent_run_id is None and not self.nested_seconds:
            started = time.monotonic()
            RunnableLambda(lambda x: x).invoke(1, config={"callbacks": [self]})
            self.nested_seconds.append(time.monotonic() - started)


def test_a_run_started_inside_a_delivery_does_not_wait_for_that_delivery() -> None:
    handler = harden(ChainInEnd(), mode="offload", settle=5.0)
    fake_chat_model(3).invoke("hi", config={"callbacks": [handler]})
    assert safecallbacks.flush(handler, 10.0)
    assert handler.nested_seconds and handler.nested_seconds[0] < 2.0  # was the full 5 s


# --- what the class says ---------------------------------------------------------------


CURRENT: ContextVar[str | None] = ContextVar("current_step", default=None)


class PublishingTracer(BaseCallbackHandler):
    """An application's tracer: the current step is published for the code that runs next."""

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        self._enter(str(kwargs.get("name")))

    def _enter(self, name: str) -> None:
        CURRENT.set(name)


def _seen_inside(handler: Any) -> str | None:
    seen: list[str | None] = []
    chain = RunnableLambda(lambda x: x) | RunnableLambda(lambda x: seen.append(CURRENT.get()))
    chain.invoke(1, config={"callbacks": [handler]})
    return seen[0]


def test_a_hook_that_publishes_context_runs_in_the_caller_from_its_first_event() -> None:
    decision = decide(PublishingTracer)
    assert decision.mode == "inline" and "ContextVar 'current_step'.set()" in decision.reason
    bare = _seen_inside(PublishingTracer())
    hardened = harden(PublishingTracer())
    assert _seen_inside(hardened) == bare is not None
    assert "publishes context" in safecallbacks.stats(hardened).mode_reason


class HiddenPublisher(BaseCallbackHandler):
    """Publishes context in a way no reading of its code can see."""

    def __init__(self) -> None:
        self.publish = CURRENT.set

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        self.publish(str(kwargs.get("name")))


def test_context_written_by_an_offloaded_hook_brings_the_handler_into_the_caller() -> None:
    handler = harden(HiddenPublisher())
    assert safecallbacks.stats(handler).mode == "offload"
    bare = _seen_inside(HiddenPublisher())
    _seen_inside(handler)  # delivered off the caller: this is where the write is seen
    assert _seen_inside(handler) == bare is not None
    stats = safecallbacks.stats(handler)
    assert stats.mode == "inline" and "writes context variable 'current_step'" in stats.mode_reason


class LatePublisher(BaseCallbackHandler):
    """Publishes context from its 100th token on, past the deliveries ``auto`` probes."""

    def __init__(self) -> None:
        self.publish = CURRENT.set
        self.tokens = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += 1
        if self.tokens >= 100:
            self.publish("late")


def test_only_the_first_deliveries_are_probed_even_when_one_drain_delivers_many() -> None:
    # A worker resolves what it calls once per drain (as here), and a drain may deliver
    # thousands of events. Probing must stop after the first PROBED_DELIVERIES all the
    # same: it costs two context copies per event, and a write seen later is outside
    # what auto promises to look at.
    assert PROBED_DELIVERIES < 99
    handler = harden(LatePublisher())
    engine = handler._sc_engine
    call = engine.sync_call("on_llm_new_token")  # once, as a worker's drain does
    for _ in range(150):
        copy_context().run(call, "tok")
    assert handler.tokens == 150
    assert engine.wanted_mode is None and safecallbacks.stats(handler).mode == "offload"
    # Within the window, the same write is seen (the rule is still there).
    early = harden(LatePublisher())
    early.tokens = 100
    copy_context().run(early._sc_engine.sync_call("on_llm_new_token"), "tok")
    assert early._sc_engine.wanted_mode is not None


def test_library_handlers_and_their_extensions_run_in_the_caller() -> None:
    from langchain_core.callbacks import StdOutCallbackHandler

    class Tagged(StdOutCallbackHandler):  # an application's extension of a library handler
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            super().on_chain_start(serialized, inputs, **kwargs)

    class Own(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            pass

    assert decide(StdOutCallbackHandler).mode == "inline"
    assert "library's handler (langchain_core)" in decide(StdOutCallbackHandler).reason
    assert decide(Tagged).mode == "inline"
    assert decide(Own).mode == "offload" and "application's own code" in decide(Own).reason


def test_registrations_and_explicit_modes_win_and_say_so() -> None:
    class Forwarder(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            pass

    class Sub(PublishingTracer):
        pass

    safecallbacks.register_offload(Sub)
    assert (
        decide(Sub).mode == "offload" and decide(Sub).reason == "registered with register_offload"
    )
    assert decide(PublishingTracer).mode == "inline"  # the registration covers subclasses only
    forced = harden(Forwarder(), mode="inline")
    assert safecallbacks.stats(forced).mode_reason == "mode='inline' given"
    with pytest.raises(TypeError, match="register_offload"):
        safecallbacks.register_offload(42)  # type: ignore[arg-type]


# --- what the handler does in its first events ---------------------------------------


class OnceSlowPublisher(PublishingTracer):
    """Inline by its class; blocks its caller once, then waits on the consumer."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.tokens = 0
        self.slept = False

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if not self.slept:
            self.slept = True
            time.sleep(0.2)
        elif self.release is not None:
            self.release.wait(5)  # inline this would hold the stream until the consumer
        self.tokens += 1


def test_an_inline_handler_that_stalls_its_caller_once_is_offloaded_for_good() -> None:
    release = threading.Event()
    handler = harden(OnceSlowPublisher(None), stall_threshold=0.05)  # type: ignore[arg-type]
    assert safecallbacks.stats(handler).mode == "inline"
    list(fake_chat_model(5, replies=2).stream("hi", config={"callbacks": [handler]}))
    stats = safecallbacks.stats(handler)
    assert stats.mode == "offload" and "on_llm_new_token blocked its caller" in stats.mode_reason
    handler.release = release
    started = time.monotonic()
    chunks = list(fake_chat_model(5).stream("hi", config={"callbacks": [handler]}))
    streamed = time.monotonic() - started
    release.set()
    assert chunks and streamed < 2.0  # off the token path: the stream did not wait for it
    assert safecallbacks.flush(handler, 10.0)


SESSION = threading.local()


class PageWriter(BaseCallbackHandler):
    """Like a UI framework's handler: its page belongs to the thread that runs the script."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        SESSION.page.append(token)  # AttributeError on any other thread
        self.written.append(token)


def test_a_handler_bound_to_its_callers_thread_is_brought_there() -> None:
    SESSION.page = []
    handler = harden(PageWriter())
    model = fake_chat_model(10, replies=3)
    counts = []
    for _ in range(3):
        chunks = list(model.stream("hi", config={"callbacks": [handler]}))
        counts.append(len(handler.written))
    stats = safecallbacks.stats(handler)
    assert stats.mode == "inline" and "failed off the caller's thread" in stats.mode_reason
    # The events that revealed it failed on a worker (counted); every other one was written.
    assert stats.failed == THREAD_TRIAL_AFTER
    assert counts == [len(chunks) * n - THREAD_TRIAL_AFTER for n in (1, 2, 3)]
    assert SESSION.page == handler.written


class AlwaysFails(BaseCallbackHandler):
    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        raise ValueError("broken everywhere")


def test_a_handler_that_fails_everywhere_stays_offloaded() -> None:
    handler = harden(AlwaysFails(), breaker=None)
    model = fake_chat_model(10, replies=2)
    for _ in range(2):
        list(model.stream("hi", config={"callbacks": [handler]}))
    assert safecallbacks.flush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert stats.mode == "offload" and "fails in the caller too" in stats.mode_reason
    assert stats.failed == stats.emitted  # and every event accounted for


# --- LangChain's own semantics, inline -------------------------------------------------


class LegacyAsyncTracer(AsyncCallbackHandler):
    """An async handler without chat-model support: LangChain falls back to on_llm_start."""

    def __init__(self) -> None:
        self.prompts: list[list[str]] = []
        self.tokens = 0

    async def on_chat_model_start(
        self, serialized: Any, messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        raise NotImplementedError

    async def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.prompts.append(prompts)

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += 1


@pytest.mark.parametrize("mode", ["inline", "auto"])
def test_an_async_handlers_llm_start_fallback_holds_from_sync_code(mode: str) -> None:
    bare = LegacyAsyncTracer()
    list(fake_chat_model(5).stream("hi", config={"callbacks": [bare]}))
    if not bare.prompts:
        pytest.skip("this langchain-core has no such fallback from sync code")
    hardened = harden(LegacyAsyncTracer(), mode=mode)  # type: ignore[arg-type]
    list(fake_chat_model(5).stream("hi", config={"callbacks": [hardened]}))
    assert safecallbacks.flush(hardened, 5.0)
    assert hardened.prompts == bare.prompts and bare.prompts
    assert hardened.tokens == bare.tokens > 0
    assert safecallbacks.stats(hardened).failed == 0
