"""Guarantee 2, "nothing stalls": the emitting side only records, in memory.

Offloaded deliveries run on worker threads (sync handlers) or as tasks of the emitting
loop (async handlers), never on the token path; a hung or slow handler cannot hold up the
stream, a flush or a close. Every property is checked on ``.stream()`` and ``.astream()``
with a sync and an async handler where both apply. Streams come from langchain-core's
``GenericFakeChatModel``; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import structlog
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

import safecallbacks
from safecallbacks import harden
from safecallbacks._hardened import engine_of
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    PacedFakeChatModel,
    RecordingHandler,
    assert_accounted,
    async_wait_until,
    fake_chat_model,
    make_tokens,
    retire_idle_workers,
    wait_until,
    worker_threads,
)
from tests._support import (
    CHUNKS,
    END,
    EVENTS,
    KINDS,
    MARGIN,
    TOKEN,
    WORDS,
    AsyncBlockingHandler,
    AsyncProbe,
    SyncProbe,
    astream_parked,
    blocker,
    by_run,
    check_complete,
    hooks_of,
    recorder,
    stream_parked,
    tokens_of,
    watchdog,
)

pytestmark = pytest.mark.timeout(60)

# --------------------------------------------------------------------------------------------
# The token path only records: no logging, no task per token, no thread start
# --------------------------------------------------------------------------------------------

SLOW_LOG_SECONDS = 0.5


@pytest.fixture
def slow_log_sink() -> Iterator[list[str]]:
    """structlog configured with a sink that needs half a second per line."""
    written: list[str] = []

    def slow(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        time.sleep(SLOW_LOG_SECONDS)
        written.append(str(event_dict.get("event")))
        raise structlog.DropEvent

    structlog.configure(processors=[slow])
    try:
        yield written
    finally:
        structlog.reset_defaults()


class FlagRaises(BaseCallbackHandler):
    @property
    def ignore_llm(self) -> bool:
        raise RuntimeError("a broken ignore flag")

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        pass


def test_logging_never_happens_on_the_emitting_thread(slow_log_sink: list[str]) -> None:
    overflowing = safecallbacks.harden(BlockingHandler(), mode="offload", max_queue=2)
    closed = safecallbacks.harden(RecordingHandler(), mode="offload")
    safecallbacks.close(closed)
    flag = safecallbacks.harden(FlagRaises(), mode="offload")
    stamps: list[float] = []
    try:
        callbacks = {"callbacks": [overflowing, closed, flag]}
        for _ in fake_chat_model(30).stream("hi", config=callbacks):
            stamps.append(time.monotonic())
    finally:
        overflowing.release()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < SLOW_LOG_SECONDS / 2, (
        f"longest gap {max(gaps):.3f}s: a log on the token path"
    )
    assert safecallbacks.flush(overflowing, 10.0) and safecallbacks.flush(flag, 10.0)
    safecallbacks.stats(closed)  # a stats read writes what is still queued
    assert wait_until(
        lambda: {"events_dropped", "ignore_flag_failed"} <= set(slow_log_sink), 10.0
    ), slow_log_sink


def test_a_paced_async_stream_costs_one_consumer_task_not_one_per_token() -> None:
    handler = safecallbacks.harden(AsyncRecordingHandler(), mode="offload")
    consumers: list[str] = []

    async def stream() -> None:
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            if getattr(coro, "__qualname__", "").endswith("_consume"):
                consumers.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)
        model = PacedFakeChatModel(tokens=make_tokens(100), interval=0.002)
        async for _ in model.astream("hi", config={"callbacks": [handler]}):
            pass
        assert await safecallbacks.aflush(handler, 5.0)

    asyncio.run(stream())
    assert len(handler.calls) == 102
    assert len(consumers) <= 3, f"{len(consumers)} consumer tasks for 100 paced tokens"


def _record_thread_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the name of the thread that starts each new thread, in order."""
    started_by: list[str] = []
    original_start = threading.Thread.start

    def recording_start(self: threading.Thread) -> None:
        started_by.append(threading.current_thread().name)
        original_start(self)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    return started_by


def test_the_first_event_after_idle_workers_left_starts_no_thread_on_the_emitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = safecallbacks.harden(RecordingHandler(), mode="offload")
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    assert safecallbacks.flush(handler, 5.0)
    assert retire_idle_workers(10.0)  # let the idle workers go now

    started_by = _record_thread_starts(monkeypatch)
    emitter = threading.current_thread().name
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    assert safecallbacks.flush(handler, 5.0)
    assert emitter not in started_by, started_by
    assert safecallbacks.stats(handler).delivered == 14


def test_the_watchdog_outlives_a_quiet_spell_while_a_handler_may_need_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whoever starts workers must still be there after a long pause, or the first token
    after it would start a thread (about 0.3 ms) on the emitting thread."""
    from safecallbacks import _workers

    handler = safecallbacks.harden(RecordingHandler(), mode="offload")
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    assert safecallbacks.flush(handler, 5.0)
    pool = _workers.pool()
    monkeypatch.setattr(pool, "idle_exit", 0.01)  # the watchdog would leave after 0.12 s
    with pool.lock:
        pool.cond.notify_all()
        pool.watch.notify_all()
    assert wait_until(lambda: worker_threads() == 0, 10.0)
    quiet_exit = pool.idle_exit * _workers.WATCHDOG_OUTLIVES
    assert not wait_until(lambda: pool.watchdog is None, timeout=5 * quiet_exit)

    started_by = _record_thread_starts(monkeypatch)
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    assert safecallbacks.flush(handler, 5.0)
    assert threading.current_thread().name not in started_by, started_by


# --------------------------------------------------------------------------------------------
# Where deliveries run
# --------------------------------------------------------------------------------------------


def test_stream_sync_handler_runs_on_worker_threads() -> None:
    handler = SyncProbe()
    safe = harden(handler)
    for _ in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]}):
        pass
    assert safe.flush(10)
    assert len(handler.seen) == EVENTS
    threads = {item.thread for item in handler.seen}
    assert threading.current_thread().name not in threads
    assert all(name.startswith("safecallbacks") for name in threads), threads
    assert {item.loop for item in handler.seen} == {None}


async def test_astream_sync_handler_runs_on_worker_threads() -> None:
    handler = SyncProbe()
    safe = harden(handler)
    async for _ in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]}):
        pass
    assert await safe.aflush(10)
    assert len(handler.seen) == EVENTS
    threads = {item.thread for item in handler.seen}
    assert threading.current_thread().name not in threads  # not the loop's thread
    assert all(name.startswith("safecallbacks") for name in threads), threads
    assert {item.loop for item in handler.seen} == {None}  # and no event loop made for it


async def test_astream_async_handler_runs_on_the_emitting_loop() -> None:
    handler = AsyncProbe()
    safe = harden(handler)
    here = asyncio.get_running_loop()
    async for _ in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]}):
        pass
    assert await safe.aflush(10)
    assert len(handler.seen) == EVENTS
    assert {item.loop for item in handler.seen} == {here}
    assert {item.thread for item in handler.seen} == {threading.current_thread().name}


async def test_astream_async_handler_follows_each_emitting_loop() -> None:
    """Two loops emitting to one handler: each event is delivered on its own emitter's loop."""
    handler = AsyncProbe()
    safe = harden(handler)
    here = asyncio.get_running_loop()
    other: dict[str, Any] = {}

    async def elsewhere() -> None:
        other["loop"] = asyncio.get_running_loop()
        async for _ in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]}):
            pass
        other["flushed"] = await safe.aflush(10)

    thread = threading.Thread(target=asyncio.run, args=(elsewhere(),))
    thread.start()
    async for _ in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]}):
        pass
    await asyncio.to_thread(thread.join, 30)  # the other loop is closed from here on
    assert other.get("flushed") is True
    assert await safe.aflush(10)
    for run_seen in by_run(handler.seen).values():
        assert len(run_seen) == EVENTS
        assert len({item.loop for item in run_seen}) == 1
    loops = {item.loop for item in handler.seen}
    assert loops == {here, other["loop"]}


def test_stream_async_handlers_share_one_background_loop() -> None:
    first, second = AsyncProbe(), AsyncProbe()
    safe_first, safe_second = harden(first), harden(second)
    config = {"callbacks": [safe_first, safe_second]}
    model = fake_chat_model(WORDS, replies=2)

    def run() -> None:
        for _ in model.stream("hi", config=config):
            pass

    thread = threading.Thread(target=run, name="second-emitter")
    thread.start()
    run()
    thread.join(30)
    assert safe_first.flush(10) and safe_second.flush(10)
    seen = first.seen + second.seen
    assert len(seen) == 4 * EVENTS
    loops = {item.loop for item in seen}
    assert len(loops) == 1, "one background loop for every sync emitter and handler"
    (loop,) = loops
    assert loop is not None and loop.is_running() and not loop.is_closed()
    threads = {item.thread for item in seen}
    assert len(threads) == 1
    assert threads.isdisjoint({threading.current_thread().name, "second-emitter"})


# --------------------------------------------------------------------------------------------
# The stream never waits for a handler
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stream_finishes_while_handler_is_blocked(kind: str, releases: list[Any]) -> None:
    stuck = blocker(kind, after=3)
    releases.append(stuck)
    safe = harden(stuck)
    timer = watchdog(stuck)
    chunks = []
    for index, chunk in enumerate(
        fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]})
    ):
        chunks.append(str(chunk.content))
        if index == 10:
            assert stuck.entered.wait(10), "the handler never reached its blocking token"
    # The whole stream went through while the handler sat on its fourth token.
    assert stuck.entered.is_set()
    assert not stuck.gate.is_set(), "the stream only finished because the watchdog fired"
    timer.cancel()
    assert len(chunks) == CHUNKS
    assert safe.stats().pending > 0
    stuck.release()
    assert safe.flush(10)
    check_complete(stuck, chunks)
    assert_accounted(safe.stats())


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_finishes_while_handler_is_blocked(kind: str, releases: list[Any]) -> None:
    stuck = blocker(kind, after=3)
    releases.append(stuck)
    safe = harden(stuck)
    timer = watchdog(stuck)
    chunks = []
    index = 0
    async for chunk in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]}):
        chunks.append(str(chunk.content))
        if index == 10:
            assert await async_wait_until(stuck.entered.is_set, 10), "handler never blocked"
        index += 1
    assert stuck.entered.is_set()
    assert not stuck.gate.is_set(), "the stream only finished because the watchdog fired"
    timer.cancel()
    assert len(chunks) == CHUNKS
    assert safe.stats().pending > 0
    stuck.release()
    assert await safe.aflush(10)
    check_complete(stuck, chunks)
    assert_accounted(safe.stats())


async def test_block_never_blocks_the_loop_that_must_drain(releases: list[Any]) -> None:
    """An async handler fed from its own loop: blocking would deadlock, so it drops at once."""
    stuck = AsyncBlockingHandler(after=0)
    releases.append(stuck)
    safe = harden(stuck, max_queue=3, on_full="block", block_timeout=5.0)
    started = time.monotonic()
    chunks = await astream_parked(safe, stuck, words=5)
    assert time.monotonic() - started < 5.0, "the emitting loop waited for its own consumer"
    stats = safe.stats()
    assert stats.dropped == 8 + 1 - 3
    stuck.release()
    assert await safe.aflush(10)
    # The one in hand and the first two queued: the third made room for on_llm_end.
    assert tokens_of(stuck.calls) == chunks[:3]
    assert hooks_of(stuck.calls)[-1] == END
    assert_accounted(safe.stats())


# --------------------------------------------------------------------------------------------
# Inline mode keeps its promise: the handler has seen each event before the chunk arrives
# --------------------------------------------------------------------------------------------


def check_inline_progress(calls: list[Any], index: int, chunk: str) -> None:
    seen = tokens_of(calls)
    assert len(seen) == index + 1, f"chunk {index} reached the consumer before its event"
    assert seen[-1] == chunk


@pytest.mark.parametrize("kind", KINDS)
def test_stream_inline_mode_delivers_before_each_chunk(kind: str) -> None:
    handler = recorder(kind)
    safe = harden(handler, mode="inline")
    chunks = []
    for index, chunk in enumerate(
        fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]})
    ):
        check_inline_progress(list(handler.calls), index, str(chunk.content))
        chunks.append(str(chunk.content))
    check_complete(handler, chunks)  # on_llm_end too, before stream() returned


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_inline_mode_delivers_before_each_chunk(kind: str) -> None:
    handler = recorder(kind)
    safe = harden(handler, mode="inline")
    chunks: list[str] = []
    async for chunk in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]}):
        check_inline_progress(list(handler.calls), len(chunks), str(chunk.content))
        chunks.append(str(chunk.content))
    check_complete(handler, chunks)


def test_offload_is_not_inline() -> None:
    """Sanity check of the check above: offload mode does not wait, so the probe can tell."""
    stuck = BlockingHandler(after=0)
    safe = harden(stuck)
    try:
        chunks = [
            str(c.content)
            for c in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]})
        ]
        assert len(chunks) == CHUNKS
        assert tokens_of(stuck.calls) == []  # nothing delivered yet, and the stream is done
    finally:
        stuck.release()
    assert safe.flush(10)
    assert tokens_of(stuck.calls) == chunks
    assert hooks_of(stuck.calls)[-1] == END and hooks_of(stuck.calls).count(TOKEN) == CHUNKS


# --------------------------------------------------------------------------------------------
# timeout: stuck sync deliveries are flagged, async ones are cut off
# --------------------------------------------------------------------------------------------


def test_sync_delivery_over_timeout_is_flagged_stuck(releases: list[Any]) -> None:
    stuck = BlockingHandler(after=3)
    releases.append(stuck)
    safe = harden(stuck, timeout=0.2)
    chunks = [
        str(c.content) for c in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]})
    ]
    assert stuck.entered.wait(10)
    assert wait_until(lambda: safe.stats().stuck, timeout=10), safe.stats()
    assert safe.stats().pending > 0
    stuck.release()
    assert safe.flush(10)
    stats = safe.stats()
    assert not stats.stuck
    # A sync call cannot be interrupted: once it returns it counts as delivered.
    assert stats.failed == 0 and stats.delivered == EVENTS, stats
    assert tokens_of(stuck.calls) == chunks
    assert_accounted(stats)


def test_stats_of_a_stuck_handler_count_what_it_already_delivered(releases: list[Any]) -> None:
    stuck = BlockingHandler(after=3)
    releases.append(stuck)
    safe = harden(stuck, timeout=0.2)
    for _ in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]}):
        pass
    assert stuck.entered.wait(10)
    assert wait_until(lambda: safe.stats().stuck, timeout=10)
    # on_chat_model_start and three tokens went through before the fourth token hung.
    assert wait_until(lambda: safe.stats().delivered == 4, timeout=5), safe.stats()
    assert safe.stats().pending == EVENTS - 4


class SlowAsync(AsyncCallbackHandler):
    """Sleeps far past ``timeout`` in its first token; records how each delivery ended."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.cancelled = 0

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if not self.tokens and not self.cancelled:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self.tokens.append(token)


def check_timed_out(safe: Any, handler: SlowAsync, chunks: list[str]) -> None:
    stats = safe.stats()
    assert stats.errors == {"TimeoutError": 1}, stats
    assert stats.hooks[TOKEN].failed == 1
    assert stats.failed == 1 and stats.delivered == CHUNKS - 1
    assert handler.cancelled == 1, "the timed-out coroutine should have been cancelled"
    assert handler.tokens == chunks[1:]  # the rest still arrives, in order
    assert_accounted(stats)


async def test_astream_async_delivery_over_timeout_fails_with_timeout_error() -> None:
    handler = SlowAsync()
    safe = harden(handler, timeout=0.2, breaker=None)
    chunks = [
        str(c.content)
        async for c in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]})
    ]
    assert await safe.aflush(10)
    check_timed_out(safe, handler, chunks)


def test_stream_async_delivery_over_timeout_fails_with_timeout_error() -> None:
    handler = SlowAsync()
    safe = harden(handler, timeout=0.2, breaker=None)
    chunks = [
        str(c.content) for c in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]})
    ]
    assert safe.flush(10)
    check_timed_out(safe, handler, chunks)


class MixedSlow(BaseCallbackHandler):
    """A sync handler with one ``async def`` hook: it is awaited from a worker, still bounded."""

    def __init__(self) -> None:
        self.ended = 0

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        await asyncio.sleep(30)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ended += 1


def test_mixed_handler_async_hook_over_timeout_fails_with_timeout_error() -> None:
    handler = MixedSlow()
    safe = harden(handler, timeout=0.1, breaker=None)
    started = time.monotonic()
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [safe]}):
        pass
    assert safe.flush(10 + 5 * 0.1)
    assert time.monotonic() - started < 5 * 0.1 + MARGIN
    stats = safe.stats()
    assert stats.errors == {"TimeoutError": 5}, stats
    assert handler.ended == 1
    assert_accounted(stats)


# --------------------------------------------------------------------------------------------
# flush and close give up on a stuck handler in time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_flush_gives_up_on_a_stuck_handler_in_time(kind: str, releases: list[Any]) -> None:
    stuck = blocker(kind)
    releases.append(stuck)
    safe = harden(stuck)
    stream_parked(safe, stuck)
    started = time.monotonic()
    assert safe.flush(0.3) is False
    assert time.monotonic() - started < 0.3 + MARGIN
    stuck.release()
    assert safe.flush(10) is True
    assert_accounted(safe.stats())


@pytest.mark.parametrize("kind", KINDS)
async def test_aflush_gives_up_on_a_stuck_handler_in_time(kind: str, releases: list[Any]) -> None:
    stuck = blocker(kind)
    releases.append(stuck)
    safe = harden(stuck)
    await astream_parked(safe, stuck)
    started = time.monotonic()
    assert await safe.aflush(0.3) is False
    assert time.monotonic() - started < 0.3 + MARGIN
    stuck.release()
    assert await safe.aflush(10) is True
    assert_accounted(safe.stats())


def test_close_on_a_stuck_handler_is_bounded_and_still_accounts(releases: list[Any]) -> None:
    stuck = BlockingHandler(after=0)
    releases.append(stuck)
    safe = harden(stuck)
    model = fake_chat_model(WORDS, replies=2)
    stream_parked(safe, stuck)
    started = time.monotonic()
    assert safe.close(0.3) is False
    assert time.monotonic() - started < 0.3 + MARGIN
    for _ in model.stream("hi", config={"callbacks": [safe]}):
        pass
    assert safe.stats().dropped >= EVENTS  # everything after close, at least
    stuck.release()
    assert wait_until(lambda: safe.stats().pending == 0, timeout=10), safe.stats()
    stats = safe.stats()
    assert stats.emitted == 2 * EVENTS
    assert_accounted(stats)


@pytest.mark.timeout(120)
def test_flush_is_not_held_up_by_an_emitting_loop_that_closes_meanwhile() -> None:
    """Everything was delivered; a loop that stops and closes during the flush owes nothing."""
    handler = AsyncRecordingHandler()
    safe = harden(handler)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()

    async def stream() -> bool:
        async for _ in fake_chat_model(5).astream("hi", config={"callbacks": [safe]}):
            pass
        return await safe.aflush(10)

    assert asyncio.run_coroutine_threadsafe(stream(), loop).result(30)
    assert safe.stats().pending == 0
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)  # stopped, not closed yet
    outcome: dict[str, Any] = {}

    def flush() -> None:
        started = time.monotonic()
        outcome["ok"] = safe.flush(5.0)
        outcome["took"] = time.monotonic() - started

    flusher = threading.Thread(target=flush)
    flusher.start()
    # Wait until the flush has queued its marker on the stopped loop's lane (internal peek).
    (lane,) = [lane for lane in engine_of(safe).lanes() if getattr(lane, "loop", None) is loop]
    assert wait_until(lambda: len(lane.queue) >= 1 or not flusher.is_alive(), 5)
    loop.close()
    flusher.join(10)
    assert outcome.get("ok") is True, outcome
    assert outcome["took"] < 5.0 - 1.0, outcome


class SwallowsCancellation(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.entered = threading.Event()

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # ignores being cancelled: its sink "must" finish


async def stream_and_return(handler: Any) -> None:
    async for _ in fake_chat_model(3).astream("hi", config={"callbacks": [handler]}):
        pass
    # Returning without aflush(): asyncio.run cancels the consumer mid-delivery.


async def emit_then_return_in_the_same_iteration(handler: Any) -> None:
    # The event kicks the loop lane's consumer; this task's next step is queued behind the
    # consumer's. In that iteration the consumer begins the delivery, which suspends and
    # moves to a carrier task, and this returns: asyncio.run stops the loop before the
    # carrier's first step, then cancels it (before the fix, the handler never saw that
    # cancellation: its coroutine was dropped unresumed).
    handler.on_llm_new_token("cut off", run_id=uuid.uuid4())
    await asyncio.sleep(0)


SHUTDOWNS = pytest.mark.parametrize(
    "shut_down",
    [stream_and_return, emit_then_return_in_the_same_iteration],
    ids=["mid-stream", "carrier-not-started"],
)


@pytest.mark.timeout(120)
@SHUTDOWNS
def test_a_hook_swallowing_cancellation_holds_loop_shutdown_only_for_the_exit_budget(
    shut_down: Callable[[Any], Awaitable[None]],
) -> None:
    handler = SwallowsCancellation()
    safe = harden(handler, mode="offload", exit_timeout=0.3, breaker=None, settle=0)
    started = time.monotonic()
    asyncio.run(shut_down(safe))
    took = time.monotonic() - started
    assert handler.entered.is_set()
    assert took < 5.0, f"asyncio.run took {took:.1f}s to end (timeout=30s, exit_timeout=0.3s)"
    stats = safe.stats()
    assert stats.failed == 0 and stats.pending == 0, stats
    assert stats.dropped == stats.emitted - stats.delivered > 0, stats


class SwallowsCancellationThenFinishes(AsyncCallbackHandler):
    """Ignores being cancelled once, then returns as if its event had been delivered."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.swallowed = 0
        self.finished = 0  # deliveries it finished without being cut off

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.entered.is_set():
            self.finished += 1
            return
        self.entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.swallowed += 1  # and returns normally: its sink never got the event


@pytest.mark.timeout(120)
@SHUTDOWNS
def test_a_hook_cut_off_by_loop_shutdown_is_dropped_even_if_it_then_returns(
    shut_down: Callable[[Any], Awaitable[None]],
) -> None:
    # README: events of a loop that shuts down are delivered while it shuts down if they
    # can be, else counted as dropped. This one was cut off by the shutdown.
    handler = SwallowsCancellationThenFinishes()
    safe = harden(handler, mode="offload", exit_timeout=0.3, breaker=None, settle=0)
    asyncio.run(shut_down(safe))
    assert handler.entered.is_set() and handler.swallowed == 1
    stats = safe.stats()
    assert stats.failed == 0 and stats.pending == 0, stats
    assert stats.delivered == handler.finished, stats  # the cut-off one is not among them
    assert stats.dropped == stats.emitted - stats.delivered > 0, stats
