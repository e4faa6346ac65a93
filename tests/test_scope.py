"""Request scopes: ``scope()``, ``@scoped``: flush and count what one request emitted.

A scope's flush waits for every hardened handler's events of the runs started
inside it, and never for other requests' events, however slow those are; its
stats count exactly its own events while other runs use the same handlers.
Everything here runs real langchain-core streams; slowness is a gate the test
holds, so "A did not wait for B" is shown while B is provably still stuck.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.runnables import RunnableLambda

import safecallbacks
from safecallbacks import scope, scoped
from safecallbacks.testing import assert_accounted, async_wait_until, fake_chat_model

pytestmark = pytest.mark.timeout(60)

WORDS = 10
CHUNKS = 2 * WORDS - 1
EVENTS = CHUNKS + 2  # start, tokens, end
GATE = 15.0  # a held handler lets go after this long whatever happens


class Held(BaseCallbackHandler):
    """Records every stream event; tokens of runs tagged ``hold`` wait for ``release``."""

    def __init__(self, pause: float = 0.0) -> None:
        self.gate = threading.Event()
        self.held = threading.Event()  # a held token is waiting now
        self.pause = pause
        self.lock = threading.Lock()
        self.seen: dict[str, list[str]] = {}  # tag -> hooks delivered

    def _note(self, hook: str, kwargs: dict[str, Any]) -> None:
        tags = kwargs.get("tags") or ["-"]
        with self.lock:
            self.seen.setdefault(tags[0], []).append(hook)

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self._note("on_chat_model_start", kwargs)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if "hold" in (kwargs.get("tags") or []):
            self.held.set()
            self.gate.wait(GATE)
        if self.pause:
            time.sleep(self.pause)
        self._note("on_llm_new_token", kwargs)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._note("on_llm_end", kwargs)

    def count(self, tag: str) -> int:
        with self.lock:
            return len(self.seen.get(tag, []))


class AsyncHeld(AsyncCallbackHandler):
    """``Held`` for async code: a held token awaits without blocking its loop."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.held = threading.Event()
        self.seen: dict[str, list[str]] = {}

    def _note(self, hook: str, kwargs: dict[str, Any]) -> None:
        self.seen.setdefault((kwargs.get("tags") or ["-"])[0], []).append(hook)

    async def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self._note("on_chat_model_start", kwargs)

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if "hold" in (kwargs.get("tags") or []):
            self.held.set()
            deadline = time.monotonic() + GATE
            while not self.gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
        self._note("on_llm_new_token", kwargs)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._note("on_llm_end", kwargs)

    def count(self, tag: str) -> int:
        return len(self.seen.get(tag, []))


def stream(handlers: list[Any], tag: str, words: int = WORDS) -> None:
    config: Any = {"callbacks": handlers, "tags": [tag]}
    for _ in fake_chat_model(words).stream("hi", config=config):
        pass


async def astream(handlers: list[Any], tag: str, words: int = WORDS) -> None:
    config: Any = {"callbacks": handlers, "tags": [tag]}
    async for _ in fake_chat_model(words).astream("hi", config=config):
        pass


@pytest.fixture
def held() -> Any:
    handler = Held()
    yield handler
    handler.gate.set()


@pytest.fixture
def aheld() -> Any:
    handler = AsyncHeld()
    yield handler
    handler.gate.set()


# --- a scope's flush never waits for other requests --------------------------------------


@pytest.mark.parametrize("b_first", [False, True], ids=["b_holding", "b_ended"])
def test_a_scope_flush_does_not_wait_for_another_requests_backlog(
    held: Held, b_first: bool
) -> None:
    """B's tokens are stuck in the shared handler; A's flush still returns True at once.

    ``b_ended``: B's run ended before A's started (B's request still in progress):
    A's run is not queued behind B's, as bare it would not be.
    """
    safe = safecallbacks.harden(held, mode="offload")
    b_streamed = threading.Event()
    b_done = threading.Event()
    results: dict[str, Any] = {}

    def request_b() -> None:
        with scope() as found:
            stream([safe], "hold")
            b_streamed.set()
            results["b"] = found.flush(GATE + 5)
            b_done.set()

    thread = threading.Thread(target=request_b)
    thread.start()
    assert held.held.wait(10), "B's handler never got its first token"
    if b_first:
        assert b_streamed.wait(10)
    with scope() as found:
        stream([safe], "a")
        started = time.monotonic()
        assert found.flush(10) is True
        waited = time.monotonic() - started
    assert not held.gate.is_set() and not b_done.is_set()  # B is still stuck meanwhile
    assert held.count("a") == EVENTS
    assert held.count("hold") < EVENTS
    snapshot = found.stats()
    assert snapshot.delivered == EVENTS and snapshot.pending == 0, snapshot
    assert waited < 5.0
    held.gate.set()
    thread.join(GATE + 10)
    assert results["b"] is True
    assert held.count("hold") == EVENTS


async def test_async_scopes_flush_their_own_runs_only(aheld: AsyncHeld) -> None:
    safe = safecallbacks.harden(aheld, mode="offload")
    b_flushed: list[bool] = []

    async def request_b() -> None:
        async with scope() as found:
            await astream([safe], "hold")
            b_flushed.append(await found.aflush(GATE + 5))

    task = asyncio.create_task(request_b())
    assert await async_wait_until(aheld.held.is_set, 10)
    async with scope() as found:
        await astream([safe], "a")
        assert await found.aflush(10) is True
    assert aheld.count("a") == EVENTS and not b_flushed
    assert found.stats().delivered == EVENTS
    aheld.gate.set()
    await asyncio.wait_for(task, GATE + 10)
    assert b_flushed == [True] and aheld.count("hold") == EVENTS


def test_a_hung_handler_times_the_scope_flush_out(held: Held) -> None:
    safe = safecallbacks.harden(held, mode="offload")
    with scope() as found:
        stream([safe], "hold")
        started = time.monotonic()
        assert found.flush(0.3) is False
        waited = time.monotonic() - started
    assert 0.25 <= waited < 3.0
    assert found.stats().pending > 0


async def test_a_hung_handler_times_the_scope_aflush_out(aheld: AsyncHeld) -> None:
    safe = safecallbacks.harden(aheld, mode="offload")
    async with scope() as found:
        await astream([safe], "hold")
        started = time.monotonic()
        assert await found.aflush(0.3) is False
        waited = time.monotonic() - started
    assert 0.25 <= waited < 3.0
    left = found.stats()
    assert left.pending > 0 and left.emitted == EVENTS


# --- stats: exactly the scope's events ------------------------------------------------------


def test_scope_stats_count_exactly_its_events_while_others_share_the_handlers() -> None:
    first, second = Held(pause=0.001), Held()
    safe = [safecallbacks.harden(first, mode="offload"), safecallbacks.harden(second)]
    stop = threading.Event()
    outside: list[int] = []

    def others() -> None:  # unscoped runs on the same handlers, all along
        while not stop.is_set():
            stream(safe, "other", words=5)
            outside.append(1)

    thread = threading.Thread(target=others)
    thread.start()
    try:
        with scope() as found:
            for _ in range(3):
                stream(safe, "mine")
            assert found.flush(10)
    finally:
        stop.set()
        thread.join(30)
    snapshot = found.stats()
    assert_accounted(snapshot)
    assert snapshot.emitted == snapshot.delivered == 3 * EVENTS * 2, snapshot
    assert snapshot.hooks["on_llm_new_token"].delivered == 3 * CHUNKS * 2
    assert snapshot.hooks["on_chat_model_start"].emitted == 6
    assert snapshot.hooks["on_llm_end"].emitted == 6
    assert outside, "the other runs never ran alongside"
    for handler in safe:
        assert safecallbacks.flush(handler, 10)
        assert safecallbacks.stats(handler).emitted > 3 * EVENTS  # the others were counted there


def test_scope_stats_are_consistent_mid_stream() -> None:
    """Snapshots taken while events are emitted and delivered always add up."""
    handler = safecallbacks.harden(Held(pause=0.0005), mode="offload")
    snapshots = []
    done = threading.Event()
    with scope() as found:

        def read() -> None:
            while not done.is_set():
                snapshots.append(found.stats())

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for _ in range(4):
                stream([handler], "mine", words=30)
            assert found.flush(10)
        finally:
            done.set()
            reader.join(10)
    assert len(snapshots) > 5
    for snapshot in snapshots:
        outcomes = snapshot.delivered + snapshot.failed + snapshot.dropped + snapshot.skipped
        assert snapshot.emitted == outcomes + snapshot.pending, snapshot
        for hook, row in snapshot.hooks.items():
            parts = row.delivered + row.failed + row.dropped + row.skipped + row.pending
            assert row.emitted == parts, (hook, row)
    assert found.stats().delivered == 4 * (2 * 30 - 1 + 2)


class Failing(BaseCallbackHandler):
    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        raise ValueError("sink down")


def test_scope_stats_count_failures_and_drops_as_the_handler_does(held: Held) -> None:
    failing = safecallbacks.harden(Failing(), mode="offload")
    shedding = safecallbacks.harden(held, mode="offload", max_queue=5)
    with scope() as found:
        stream([failing, shedding], "hold")
        held.gate.set()
        assert found.flush(10)
    snapshot = found.stats()
    assert_accounted(snapshot)
    assert snapshot.failed == CHUNKS
    assert snapshot.errors == {"ValueError": CHUNKS}
    both = [safecallbacks.stats(failing), safecallbacks.stats(shedding)]
    assert snapshot.dropped == sum(s.dropped for s in both) > 0
    assert snapshot.emitted == sum(s.emitted for s in both)
    assert snapshot.hooks["on_llm_end"].delivered == 1  # shed tokens, never the run's end


# --- membership -------------------------------------------------------------------------------


async def test_tasks_started_inside_belong_to_the_scope(aheld: AsyncHeld) -> None:
    safe = safecallbacks.harden(aheld, mode="offload")
    async with scope() as found:
        await asyncio.gather(*(asyncio.create_task(astream([safe], "mine")) for _ in range(3)))
    await astream([safe], "outside")
    assert await found.aflush(10)
    assert found.stats().emitted == 3 * EVENTS


def test_a_batch_inside_a_scope_belongs_to_it() -> None:
    """LangChain runs a batch's items on executor threads, with the caller's context."""
    handler = safecallbacks.harden(Held(), mode="offload")
    chain = RunnableLambda(lambda x: x) | fake_chat_model(WORDS, replies=4)
    with scope() as found:
        chain.batch(["a", "b", "c", "d"], config={"callbacks": [handler]})
        assert found.flush(10)
    snapshot = found.stats()
    assert "on_chain_start" not in snapshot.hooks  # Held has no chain hooks: nothing counted
    assert snapshot.hooks["on_chat_model_start"].delivered == 4
    assert snapshot.hooks["on_llm_end"].delivered == 4  # invoked, not streamed: no tokens
    assert snapshot.emitted == snapshot.delivered == safecallbacks.stats(handler).emitted == 8


def test_an_outer_scope_covers_the_scopes_opened_inside_it(held: Held) -> None:
    safe = safecallbacks.harden(held, mode="offload")
    with scope() as outer:
        stream([safe], "mine")
        with scope() as inner:
            stream([safe], "hold")
        assert outer.flush(0.3) is False  # the inner scope's run is stuck, and it is outer's
        assert inner.stats().pending > 0
        held.gate.set()
        assert outer.flush(10)
    assert outer.stats().delivered == 2 * EVENTS
    assert inner.stats().delivered == EVENTS


def test_runs_of_scopes_one_after_another_are_still_never_delivered_at_once() -> None:
    """A script calling a @scoped function twice: bare, one call at a time; so hardened."""

    class Meter(BaseCallbackHandler):
        def __init__(self) -> None:
            self.inside = 0
            self.most = 0
            self.lock = threading.Lock()

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.002)
            with self.lock:
                self.inside -= 1

    meter = Meter()
    safe = safecallbacks.harden(meter, mode="offload")

    @scoped(flush_timeout=0.0)  # no waiting: the next call's run is emitted meanwhile
    def handle(tag: str) -> None:
        stream([safe], tag)

    for index in range(4):
        handle(f"call{index}")
    assert safecallbacks.flush(safe, 10)
    assert safecallbacks.stats(safe).delivered == 4 * CHUNKS
    assert meter.most == 1


# --- @scoped ----------------------------------------------------------------------------------


def test_scoped_sync_function_returns_with_its_events_delivered() -> None:
    handler = Held(pause=0.002)
    safe = safecallbacks.harden(handler, mode="offload")

    @scoped(flush_timeout=10)
    def task(tag: str) -> str:
        stream([safe], tag)
        return tag

    assert task("t1") == "t1"
    assert handler.count("t1") == EVENTS
    assert task("t2") == "t2"
    assert handler.count("t2") == EVENTS


async def test_scoped_async_function_returns_with_its_events_delivered() -> None:
    handler = AsyncHeld()
    safe = safecallbacks.harden(handler, mode="offload")

    @scoped
    async def task(tag: str) -> str:
        await astream([safe], tag)
        return tag

    assert await task("t1") == "t1"
    assert handler.count("t1") == EVENTS


def test_scoped_logs_what_it_could_not_deliver(held: Held) -> None:
    from structlog.testing import capture_logs

    safe = safecallbacks.harden(held, mode="offload")

    @scoped(flush_timeout=0.2)
    def task() -> None:
        stream([safe], "hold")

    with capture_logs() as logs:
        task()
    lines = [line for line in logs if line["event"] == "scope_flush_timed_out"]
    assert len(lines) == 1, logs
    assert lines[0]["pending"] > 0 and "task" in lines[0]["where"]


# --- misuse -----------------------------------------------------------------------------------


def test_bad_use_is_refused_with_a_clear_error() -> None:
    found = scope()
    with pytest.raises(ValueError, match="timeout"):
        found.flush(-1)
    with pytest.raises(TypeError, match="timeout"):
        found.flush("soon")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="flush_timeout"):
        scoped(flush_timeout="x")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="function"):
        scoped(3)  # type: ignore[call-overload]
    with found:
        pass
    with pytest.raises(RuntimeError, match="entered once"):
        found.__enter__()
    assert found.flush(0.1) is True  # nothing ran in it


async def test_a_blocking_scope_flush_inside_a_loop_names_the_way_out() -> None:
    with pytest.raises(RuntimeError, match="aflush"):
        scope().flush(1)
