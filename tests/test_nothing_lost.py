"""Guarantee 3, "nothing is lost silently": flush tells the truth, every event is accounted.

Queues are bounded and what ``on_full`` drops is counted as it happens; a flush barrier
never costs an event its place; ``emitted == delivered + failed + dropped + skipped``
holds after any flush, under load, with faulty handlers, when event loops end and when the
interpreter exits; each handler sees each run's events once and in order.

A handler parked on an ``Event`` holds its queue still, so which events are kept and which
are dropped is exact, not statistical.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import sys
import textwrap
import threading
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import HumanMessage
from langchain_core.outputs import LLMResult

import safecallbacks
from safecallbacks import _dispatch, _hardened, _workers, harden
from safecallbacks._hardened import engine_of
from safecallbacks._queue import Barrier
from safecallbacks._runs import emitter_key
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    FaultyHandler,
    PacedFakeChatModel,
    RecordingHandler,
    assert_accounted,
    fake_chat_model,
    make_tokens,
    wait_until,
)
from tests._child import run_reporting
from tests._support import (
    CHUNKS,
    END,
    EVENTS,
    KINDS,
    MARGIN,
    START,
    TOKEN,
    WORDS,
    astream_parked,
    blocker,
    by_run,
    chunk_count,
    expected_hooks,
    hooks_of,
    recorder,
    stream_parked,
    token_of,
    tokens_of,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# Flush barriers
# --------------------------------------------------------------------------------------------


def llm_run(handler: Any) -> CallbackManagerForLLMRun:
    manager = CallbackManager.configure(inheritable_callbacks=[handler])
    return manager.on_chat_model_start({"name": "t"}, [[HumanMessage("hi")]])[0]


def barriers_queued(handler: Any) -> int:
    return sum(1 for e in list(engine_of(handler)._thread_lane.queue) if isinstance(e, Barrier))


def test_drop_oldest_never_pops_a_flush_barrier_while_an_event_is_in_delivery() -> None:
    handler = safecallbacks.harden(
        BlockingHandler(), mode="offload", max_queue=4, on_full="drop_oldest", breaker=None
    )
    run = llm_run(handler)
    run.on_llm_new_token("first")  # delivered, and hangs in the handler
    assert handler.entered.wait(5.0)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(safecallbacks.flush(handler, 0.5)))
    flusher.start()
    try:
        assert wait_until(lambda: barriers_queued(handler) == 1, 5.0)
        for index in range(10):  # overflow: the oldest events make room, the barrier stays
            run.on_llm_new_token(f"t{index}")
        flusher.join(5.0)
        assert result == [False], "flush returned True while an event was still in delivery"
        stats = safecallbacks.stats(handler)
        assert stats.pending >= 1 and stats.dropped == 6
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert (stats.emitted, stats.delivered, stats.dropped, stats.pending) == (12, 6, 6, 0)


def test_a_flush_barrier_never_costs_an_event_its_place() -> None:
    handler = safecallbacks.harden(BlockingHandler(), mode="offload", max_queue=3, breaker=None)
    run = llm_run(handler)
    run.on_llm_new_token("in delivery")
    assert handler.entered.wait(5.0)
    for index in range(2):
        run.on_llm_new_token(f"queued {index}")
    try:
        assert safecallbacks.flush(handler, 0.05) is False  # leaves a barrier in the queue
        run.on_llm_new_token("third queued event: room for it, the barrier takes none")
        assert safecallbacks.stats(handler).dropped == 0
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert (stats.delivered, stats.dropped) == (5, 0)
    assert [c.kwargs.get("token", c.args[0] if c.args else None) for c in handler.calls][
        -1
    ] == "third queued event: room for it, the barrier takes none"


def test_blocking_handler_blocks_the_hook_it_was_asked_to() -> None:
    handler = safecallbacks.harden(BlockingHandler(hook="on_llm_end"), mode="offload")
    run = llm_run(handler)
    run.on_llm_new_token("t")
    from langchain_core.outputs import LLMResult

    run.on_llm_end(LLMResult(generations=[[]]))
    try:
        assert handler.entered.wait(5.0)
        assert [c.hook for c in handler.calls] == ["on_chat_model_start", "on_llm_new_token"]
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)
    assert uuid  # the run ids are LangChain's own


# --- shutdown is not the handler's failure -------------------------------------------


class HangsAsync(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.started = 0

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.started += 1
        await asyncio.Event().wait()  # never returns: only its loop's shutdown ends it


def test_an_event_cut_off_by_loop_shutdown_is_dropped_not_failed() -> None:
    handler = safecallbacks.harden(HangsAsync(), mode="offload", exit_timeout=0.2, breaker=None)

    async def request() -> None:
        async for _ in fake_chat_model(3).astream("hi", config={"callbacks": [handler]}):
            pass

    asyncio.run(request())  # shuts its loop down with the delivery still hanging
    stats = safecallbacks.stats(handler)
    assert handler.started >= 1
    assert stats.failed == 0 and dict(stats.errors) == {}, stats
    assert stats.pending == 0 and stats.dropped == stats.emitted - stats.delivered > 0, stats


# --- one snapshot, one state -----------------------------------------------------------


class FailsSlowly(BaseCallbackHandler):
    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        time.sleep(0.0005)  # slow enough that snapshots land in the middle of a batch
        raise ValueError("a failing sink")


def test_stats_agree_with_themselves_during_a_backlog() -> None:
    handler = safecallbacks.harden(FailsSlowly(), mode="offload", breaker=None)
    run = llm_run(handler)
    for index in range(300):
        run.on_llm_new_token(f"t{index}")
    highs: list[int] = []
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        stats = safecallbacks.stats(handler)
        highs.append(stats.queue_high_water)
        assert sum(stats.errors.values()) == stats.failed, stats
        rows = stats.hooks.values()
        assert sum(r.failed for r in rows) == stats.failed
        assert sum(r.delivered for r in rows) == stats.delivered
        if stats.failed == 300:
            break
    assert highs == sorted(highs), "queue_high_water fell"
    assert safecallbacks.flush(handler, 10.0)
    stats = safecallbacks.stats(handler)
    assert all(row.pending == 0 for row in stats.hooks.values()) and stats.pending == 0
    assert stats.failed == 300 and dict(stats.errors) == {"ValueError": 300}


async def test_right_after_aflush_no_hook_row_is_pending() -> None:
    handler = safecallbacks.harden(RecordingHandler(), mode="offload")
    for _ in range(20):
        async for _ in fake_chat_model(5).astream("hi", config={"callbacks": [handler]}):
            pass
        assert await safecallbacks.aflush(handler, 5.0)
        stats = safecallbacks.stats(handler)
        assert stats.pending == 0
        assert not [h for h, row in stats.hooks.items() if row.pending], stats


# --- closed loops are let go -----------------------------------------------------------


def test_a_shared_async_handler_does_not_keep_closed_loops_alive() -> None:
    handler = safecallbacks.harden(AsyncRecordingHandler(), mode="offload")
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def request() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async for _ in fake_chat_model(2).astream("hi", config={"callbacks": [handler]}):
            pass

    for _ in range(200):
        asyncio.run(request())
    gc.collect()
    alive = [ref for ref in loops if ref() is not None]
    assert len(alive) <= 1, f"{len(alive)} closed loops still alive"
    stats = safecallbacks.stats(handler)
    assert stats.pending == 0 and stats.emitted == stats.delivered + stats.dropped


# --------------------------------------------------------------------------------------------
# Order, exactly once
# --------------------------------------------------------------------------------------------


def check_runs(calls: list[Any], runs: list[list[str]]) -> None:
    """Sequential runs: the handler saw each run's events once, in order, run after run."""
    assert hooks_of(calls) == expected_hooks(CHUNKS) * len(runs)
    grouped = by_run(calls)
    assert len(grouped) == len(runs)
    for run_calls, chunks in zip(grouped.values(), runs, strict=True):
        assert hooks_of(run_calls) == expected_hooks(CHUNKS)
        assert tokens_of(run_calls) == chunks


@pytest.mark.parametrize("kind", KINDS)
def test_stream_delivers_each_event_once_in_order(kind: str) -> None:
    handler = recorder(kind)
    safe = harden(handler, breaker=None)
    model = fake_chat_model(WORDS, replies=3)
    runs = [
        [str(chunk.content) for chunk in model.stream("hi", config={"callbacks": [safe]})]
        for _ in range(3)
    ]
    assert safe.flush(10)
    check_runs(handler.calls, runs)
    stats = safe.stats()
    assert stats.emitted == stats.delivered == 3 * EVENTS
    assert_accounted(stats)


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_delivers_each_event_once_in_order(kind: str) -> None:
    handler = recorder(kind)
    safe = harden(handler, breaker=None)
    model = fake_chat_model(WORDS, replies=3)
    runs = []
    for _ in range(3):
        runs.append(
            [str(c.content) async for c in model.astream("hi", config={"callbacks": [safe]})]
        )
    assert await safe.aflush(10)
    check_runs(handler.calls, runs)
    stats = safe.stats()
    assert stats.emitted == stats.delivered == 3 * EVENTS
    assert_accounted(stats)


def test_sync_handler_gets_chat_model_start_delivered() -> None:
    """The first event of every chat-model run reaches an offloaded sync handler intact."""
    handler = RecordingHandler()
    safe = harden(handler, breaker=None)
    for _ in fake_chat_model(3).stream("hello there", config={"callbacks": [safe]}):
        pass
    assert safe.flush(10)
    stats = safe.stats()
    assert stats.errors == {}, stats
    assert stats.hooks[START].delivered == 1, stats
    (start,) = handler.hooks(START)
    _serialized, messages = start.args
    assert messages[0][0].content == "hello there"


# --------------------------------------------------------------------------------------------
# Bounded queues: on_full="drop_newest" / "drop_oldest"
# --------------------------------------------------------------------------------------------

MAX_QUEUE = 10
# The handler parks in token 0; the 38 later tokens and on_llm_end then meet a full queue.
BEHIND = CHUNKS - 1 + 1


def expect_kept(policy: str, chunks: list[str]) -> tuple[list[str], bool]:
    """(the tokens the handler ends up with, whether on_llm_end survives)."""
    if policy == "drop_newest":
        # token 0 (in hand), the first N queued but the newest of them: shed for on_llm_end
        return chunks[:MAX_QUEUE], True
    # token 0, then the last N events: the last N-1 tokens and on_llm_end
    return [chunks[0], *chunks[-(MAX_QUEUE - 1) :]], True


def check_drops(policy: str, safe: Any, stuck: Any, chunks: list[str]) -> None:
    kept, end_kept = expect_kept(policy, chunks)
    assert tokens_of(stuck.calls) == kept
    assert hooks_of(stuck.calls) == [START, *([TOKEN] * len(kept)), *([END] if end_kept else [])]
    stats = safe.stats()
    assert stats.emitted == EVENTS
    assert stats.dropped == BEHIND - MAX_QUEUE, stats
    assert stats.hooks[TOKEN].dropped == CHUNKS - len(kept)
    assert stats.hooks[END].dropped == (0 if end_kept else 1)
    assert stats.delivered == EVENTS - stats.dropped
    assert_accounted(stats)


def check_full(safe: Any) -> None:
    stats = safe.stats()
    assert stats.queue_depth == MAX_QUEUE, stats
    assert MAX_QUEUE <= stats.queue_high_water <= MAX_QUEUE + 1, stats  # +1: the one in hand
    assert stats.dropped == BEHIND - MAX_QUEUE, "every drop is counted as it happens"


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
@pytest.mark.parametrize("kind", KINDS)
def test_stream_full_queue_drops_by_policy(policy: str, kind: str, releases: list[Any]) -> None:
    stuck = blocker(kind)
    releases.append(stuck)
    safe = harden(stuck, max_queue=MAX_QUEUE, on_full=policy)
    chunks = stream_parked(safe, stuck)
    assert len(chunks) == CHUNKS
    check_full(safe)
    stuck.release()
    assert safe.flush(10)
    check_drops(policy, safe, stuck, chunks)


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
@pytest.mark.parametrize("kind", KINDS)
async def test_astream_full_queue_drops_by_policy(
    policy: str, kind: str, releases: list[Any]
) -> None:
    stuck = blocker(kind)
    releases.append(stuck)
    safe = harden(stuck, max_queue=MAX_QUEUE, on_full=policy)
    chunks = await astream_parked(safe, stuck)
    assert len(chunks) == CHUNKS
    check_full(safe)
    stuck.release()
    assert await safe.aflush(10)
    check_drops(policy, safe, stuck, chunks)


# --------------------------------------------------------------------------------------------
# on_full="block"
# --------------------------------------------------------------------------------------------


def test_block_waits_block_timeout_then_drops(releases: list[Any]) -> None:
    stuck = BlockingHandler(after=0)
    releases.append(stuck)
    wait = 0.1
    safe = harden(stuck, max_queue=3, on_full="block", block_timeout=wait)
    started = time.monotonic()
    chunks = stream_parked(safe, stuck, words=5)  # 9 chunks: 8 tokens and the end behind
    took = time.monotonic() - started
    overflow = 8 + 1 - 3
    assert took >= overflow * wait * 0.9, "each overflowing event should wait block_timeout"
    assert took < overflow * wait + MARGIN
    stats = safe.stats()
    assert stats.dropped == overflow and stats.queue_depth == 3
    stuck.release()
    assert safe.flush(10)
    # The one in hand and the first two queued: the third made room for on_llm_end, kept
    # once it too had waited block_timeout.
    assert tokens_of(stuck.calls) == chunks[:3]
    assert hooks_of(stuck.calls)[-1] == END
    assert_accounted(safe.stats())


def test_block_keeps_every_event_when_room_appears(releases: list[Any]) -> None:
    stuck = BlockingHandler(after=0)
    releases.append(stuck)
    safe = harden(stuck, max_queue=3, on_full="block", block_timeout=30.0)

    def release_when_full() -> None:
        if wait_until(lambda: safe.stats().queue_depth >= 3, timeout=20):
            stuck.release()

    helper = threading.Thread(target=release_when_full)
    helper.start()
    chunks = stream_parked(safe, stuck)
    helper.join(30)
    assert stuck.gate.is_set(), "the queue never filled up"
    assert safe.flush(10)
    stats = safe.stats()
    assert stats.dropped == 0, stats
    assert stats.delivered == stats.emitted == EVENTS
    assert tokens_of(stuck.calls) == chunks
    assert stats.queue_high_water <= 3 + 1


# --------------------------------------------------------------------------------------------
# close and the context managers: everything delivered first, everything after counted
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_events_after_close_are_dropped_and_counted(kind: str) -> None:
    handler = recorder(kind)
    safe = harden(handler)
    model = fake_chat_model(WORDS, replies=2)
    for _ in model.stream("hi", config={"callbacks": [safe]}):
        pass
    assert safe.close(10) is True
    assert safe.stats().closed
    assert hooks_of(handler.calls) == expected_hooks(CHUNKS)  # close flushed first
    chunks = [str(c.content) for c in model.stream("hi", config={"callbacks": [safe]})]
    assert len(chunks) == CHUNKS  # the stream itself is unaffected
    assert safe.flush(1)
    stats = safe.stats()
    assert stats.emitted == 2 * EVENTS
    assert stats.delivered == EVENTS and stats.dropped == EVENTS, stats
    assert len(handler.calls) == EVENTS
    assert_accounted(stats)


async def test_events_after_aclose_are_dropped_and_counted() -> None:
    handler = AsyncRecordingHandler()
    safe = harden(handler)
    model = fake_chat_model(WORDS, replies=2)
    async for _ in model.astream("hi", config={"callbacks": [safe]}):
        pass
    assert await safe.aclose(10) is True
    async for _ in model.astream("hi", config={"callbacks": [safe]}):
        pass
    stats = safe.stats()
    assert stats.closed
    assert stats.delivered == EVENTS and stats.dropped == EVENTS, stats
    assert len(handler.calls) == EVENTS
    assert_accounted(stats)


def test_hardening_a_closed_handler_again_reopens_it() -> None:
    handler = RecordingHandler()
    first = harden(handler)
    first.close(5)
    assert first.stats().closed
    second = harden(handler)
    assert second is first and not second.stats().closed
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [second]}):
        pass
    assert second.flush(10)
    assert hooks_of(handler.calls) == expected_hooks(chunk_count(3))


def test_context_manager_closes_after_delivering_everything() -> None:
    handler = RecordingHandler()
    with harden(handler) as safe:
        chunks = [
            str(c.content)
            for c in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]})
        ]
    stats = safe.stats()
    assert stats.closed
    assert stats.delivered == EVENTS
    assert tokens_of(handler.calls) == chunks
    assert_accounted(stats)


def test_context_manager_closes_when_the_body_raises() -> None:
    handler = RecordingHandler()
    safe = harden(handler)
    with pytest.raises(RuntimeError, match="body failed"), safe:
        for _ in fake_chat_model(WORDS).stream("hi", config={"callbacks": [safe]}):
            pass
        raise RuntimeError("body failed")
    assert safe.stats().closed
    assert hooks_of(handler.calls) == expected_hooks(CHUNKS)


async def test_async_context_manager_closes_after_delivering_everything() -> None:
    handler = AsyncRecordingHandler()
    async with harden(handler) as safe:
        chunks = [
            str(c.content)
            async for c in fake_chat_model(WORDS).astream("hi", config={"callbacks": [safe]})
        ]
    stats = safe.stats()
    assert stats.closed
    assert stats.delivered == EVENTS
    assert tokens_of(handler.calls) == chunks
    assert_accounted(stats)


# --------------------------------------------------------------------------------------------
# Interpreter exit: the drain delivers what it can in exit_timeout and counts the rest
# (child interpreters, so the atexit drain really runs)
# --------------------------------------------------------------------------------------------

EXIT_MARGIN = 1.5  # slack on top of exit_timeout for a loaded 2-core machine

HUNG_AT_EXIT = """
class Hung(BaseCallbackHandler):
    # Sync or async, it takes three tokens and then never returns from the fourth.
    def __init__(self):
        self.tokens = 0
        self.entered = threading.Event()

    def on_chat_model_start(self, serialized, messages, **kwargs):
        pass

    def on_llm_end(self, response, **kwargs):
        pass

class SyncHung(Hung):
    def on_llm_new_token(self, token, **kwargs):
        self.tokens += 1
        if self.tokens > 3:
            self.entered.set()
            threading.Event().wait()

class AsyncHung(AsyncCallbackHandler):
    def __init__(self):
        self.tokens = 0
        self.entered = threading.Event()

    async def on_chat_model_start(self, serialized, messages, **kwargs):
        pass

    async def on_llm_new_token(self, token, **kwargs):
        self.tokens += 1
        if self.tokens > 3:
            self.entered.set()
            await asyncio.Event().wait()

    async def on_llm_end(self, response, **kwargs):
        pass

handler = SyncHung() if KIND == "sync" else AsyncHung()
options = {} if EXIT_TIMEOUT is None else {"exit_timeout": EXIT_TIMEOUT}
safe = WATCHED["hung"] = harden(handler, **options)
for _ in fake_chat_model(20).stream("hi", config={"callbacks": [safe]}):
    pass
assert handler.entered.wait(10)
RESULT["at_main_end"] = summary(safe.stats())
RESULT["main_done"] = time.monotonic()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("how", ["option", "env"])
def test_exit_is_bounded_with_a_hung_handler(tmp_path: Path, kind: str, how: str) -> None:
    exit_timeout = 0.5
    preamble = f"KIND = {kind!r}\nEXIT_TIMEOUT = {exit_timeout if how == 'option' else None!r}\n"
    env = {"SAFECALLBACKS_EXIT_TIMEOUT": str(exit_timeout)} if how == "env" else {}
    result = run_reporting(tmp_path, preamble + textwrap.dedent(HUNG_AT_EXIT), env=env)
    assert result["drain_seconds"] <= exit_timeout + EXIT_MARGIN, result
    assert result["drain_seconds"] >= exit_timeout * 0.9, "the drain gave up before its deadline"
    stats = result["after_exit"]["hung"]
    events = 39 + 2
    assert stats["emitted"] == events
    assert stats["closed"] is True
    # Start and three tokens delivered, the fourth token stuck in the handler for good; the
    # 36 events queued behind it can never be delivered and must be counted as dropped.
    assert stats["delivered"] == 4, result
    assert stats["dropped"] == events - 5, result
    assert stats["pending"] == 1, result


SLOW_AT_EXIT = """
class SyncSlow(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        time.sleep(0.01)
        self.tokens.append(token)

class AsyncSlow(AsyncCallbackHandler):
    def __init__(self):
        self.tokens = []

    async def on_llm_new_token(self, token, **kwargs):
        await asyncio.sleep(0.01)
        self.tokens.append(token)

handlers = {"sync": SyncSlow(), "async": AsyncSlow()}
for name, handler in handlers.items():
    WATCHED[name] = harden(handler, exit_timeout=20.0, settle=0)  # leave work for the exit
config = {"callbacks": list(WATCHED.values())}
chunks = [c.content for c in fake_chat_model(20).stream("hi", config=config)]

def final_tokens():
    RESULT["tokens_ok"] = {name: h.tokens == chunks for name, h in handlers.items()}
    RESULT["token_counts"] = {name: len(h.tokens) for name, h in handlers.items()}

LATE.append(final_tokens)
RESULT["at_main_end"] = {name: summary(safe.stats()) for name, safe in WATCHED.items()}
RESULT["main_done"] = time.monotonic()
"""


@pytest.mark.timeout(120)
def test_exit_delivers_pending_events_of_a_slow_handler(tmp_path: Path) -> None:
    result = run_reporting(tmp_path, SLOW_AT_EXIT)
    for name in ("sync", "async"):
        at_end, after = result["at_main_end"][name], result["after_exit"][name]
        assert at_end["pending"] > 0, "nothing was left for the exit drain to do"
        assert after["pending"] == 0, result
        assert after["delivered"] == after["emitted"] == 39, result
        assert after["dropped"] == 0
    assert result["token_counts"] == {"sync": 39, "async": 39}
    assert result["tokens_ok"] == {"sync": True, "async": True}, "in order, each once"
    assert result["drain_seconds"] < 20.0


@pytest.mark.timeout(120)
def test_exit_without_hardened_handlers_pending_is_immediate(tmp_path: Path) -> None:
    body = """
    from safecallbacks.testing import RecordingHandler
    safe = WATCHED["idle"] = harden(RecordingHandler(), exit_timeout=10.0)
    for _ in fake_chat_model(5).stream("hi", config={"callbacks": [safe]}):
        pass
    assert safe.flush(10)
    RESULT["main_done"] = time.monotonic()
    """
    result = run_reporting(tmp_path, body)
    assert result["drain_seconds"] < EXIT_MARGIN  # nothing pending: no wait for exit_timeout
    assert result["after_exit"]["idle"]["pending"] == 0


# --------------------------------------------------------------------------------------------
# Event loops that close with events still queued
# --------------------------------------------------------------------------------------------


class SlowAsync(AsyncCallbackHandler):
    def __init__(self, delay: float | None) -> None:
        self.delay = delay  # None: never returns
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        self.tokens.append(token)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay", [0.01, None], ids=["slow", "hung"])
def test_asyncio_run_ending_with_events_pending_accounts_for_them(delay: float | None) -> None:
    handler = SlowAsync(delay)
    exit_timeout = 0.3
    # settle=0: the stream's end does not wait, so events are left for the loop's shutdown.
    safe = harden(handler, exit_timeout=exit_timeout, breaker=None, settle=0)
    seen: dict[str, Any] = {}

    async def main() -> None:
        async for _ in fake_chat_model(20).astream("hi", config={"callbacks": [safe]}):
            pass
        seen["pending_in_loop"] = safe.stats().pending
        # Returning without aflush(): asyncio.run now cancels the delivery task and closes.

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 30 * 0.01 + exit_timeout + EXIT_MARGIN
    assert seen["pending_in_loop"] > 0
    stats = safe.stats()
    assert stats.emitted == 39
    assert stats.pending == 0, stats
    # A delivery cut off by the shutdown may have finished in the handler a moment before
    # its consumer was cancelled: then it is counted failed, never lost and never twice.
    assert stats.delivered <= len(handler.tokens) <= stats.delivered + stats.failed, stats
    assert stats.delivered + stats.failed + stats.dropped == stats.emitted, stats
    assert_accounted(stats)
    assert safe.flush(1)


@pytest.mark.timeout(120)
def test_loop_closed_without_cancelling_its_tasks_accounts_for_the_events() -> None:
    handler = SlowAsync(0.01)
    safe = harden(handler, breaker=None)

    async def main() -> None:
        async for _ in fake_chat_model(20).astream("hi", config={"callbacks": [safe]}):
            pass

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()  # the delivery task is still pending: it will never run again
    del loop
    first = safe.stats()
    unraisable: list[Any] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        gc.collect()  # the abandoned delivery coroutines are closed now, not at some later time
    finally:
        sys.unraisablehook = previous_hook
    stats = safe.stats()
    for seen in (first, stats):  # before and after the garbage is gone: the same account
        assert seen.emitted == 39
        assert seen.pending == 0, seen
        assert seen.delivered == len(handler.tokens)
        assert_accounted(seen)  # each event counted once, however the loop went away
    assert stats.dropped == first.dropped and stats.failed == first.failed
    # The handler did nothing wrong: closing the loop must not be reported as its failure,
    # nor print "Exception ignored in: <coroutine ...>" when the leftovers are collected.
    assert "GeneratorExit" not in stats.errors, stats
    assert not unraisable, [f"{u.exc_value!r} in {u.object!r}" for u in unraisable]


# --------------------------------------------------------------------------------------------
# Load: 64 concurrent .astream() tasks and 4 threads running .stream(), all sharing three
# hardened handlers (sync recording, async recording, always failing). Over 100,000 events
# in total; every run must arrive complete and in order, and every event be counted.
# Sized to take well under a minute on a loaded 2-core machine.
# --------------------------------------------------------------------------------------------

TASKS, STREAMS_PER_TASK = 64, 8
THREADS, STREAMS_PER_THREAD = 4, 40
STRESS_CHUNKS = 100
STRESS_PER_RUN = STRESS_CHUNKS + 2  # on_chat_model_start, the chunks, on_llm_end
STRESS_RUNS = TASKS * STREAMS_PER_TASK + THREADS * STREAMS_PER_THREAD
STRESS_TOKENS = make_tokens(STRESS_CHUNKS)
STRESS_EXPECTED = [("on_chat_model_start", None)] + [("on_llm_new_token", t) for t in STRESS_TOKENS]
STRESS_EXPECTED.append(("on_llm_end", None))


def stress_model() -> PacedFakeChatModel:
    return PacedFakeChatModel(tokens=STRESS_TOKENS, interval=0)


def per_run(calls: list[Any]) -> dict[Any, list[tuple[str, str | None]]]:
    runs: dict[Any, list[tuple[str, str | None]]] = defaultdict(list)
    for call in calls:
        token = token_of(call) if call.hook == "on_llm_new_token" else None
        runs[call.run_id].append((call.hook, token))
    return runs


@pytest.mark.timeout(180)
async def test_many_concurrent_streams_share_hardened_handlers() -> None:
    recording, arecording = RecordingHandler(), AsyncRecordingHandler()
    failing = FaultyHandler()
    room = STRESS_RUNS * STRESS_PER_RUN  # no drops: completeness can be checked exactly
    safes = [
        harden(recording, max_queue=room, breaker=None),
        harden(arecording, max_queue=room, breaker=None),
        harden(failing, breaker=None),
    ]
    config = {"callbacks": safes}
    errors: list[BaseException] = []
    started = time.monotonic()

    def sync_streams() -> None:
        try:
            for _ in range(STREAMS_PER_THREAD):
                chunks = [c.content for c in stress_model().stream("hi", config=config)]
                assert chunks == STRESS_TOKENS
        except BaseException as exc:
            errors.append(exc)

    async def async_streams() -> None:
        for _ in range(STREAMS_PER_TASK):
            chunks = []
            async for chunk in stress_model().astream("hi", config=config):
                chunks.append(chunk.content)
                await asyncio.sleep(0)  # let the other 63 streams interleave
            assert chunks == STRESS_TOKENS

    threads = [threading.Thread(target=sync_streams) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(async_streams() for _ in range(TASKS)))
    for thread in threads:
        await asyncio.to_thread(thread.join, 120)
    assert not errors, errors
    streamed = time.monotonic() - started

    for safe in safes:
        assert await safe.aflush(60), safe.stats()
    total = 0
    for safe in safes:
        stats = safe.stats()
        assert stats.emitted == STRESS_RUNS * STRESS_PER_RUN, stats
        assert stats.pending == 0 and stats.queue_depth == 0, stats
        assert_accounted(stats)
        total += stats.emitted
    assert total >= 100_000

    for handler in (recording, arecording):
        runs = per_run(list(handler.calls))
        assert len(runs) == STRESS_RUNS
        broken = [run_id for run_id, seen in runs.items() if seen != STRESS_EXPECTED]
        assert not broken, f"{len(broken)} runs out of order or incomplete"
        stats = safes[0 if handler is recording else 1].stats()
        assert stats.delivered == STRESS_RUNS * STRESS_PER_RUN and stats.dropped == 0, stats

    failed = safes[2].stats()
    assert failed.failed + failed.dropped == STRESS_RUNS * STRESS_PER_RUN, failed
    assert set(failed.errors) <= {"ValueError"}
    assert failing.calls == failed.failed
    # Not a benchmark; just keep an eye on it in the output of -rA / failures.
    print(f"streamed {total:,} events in {streamed:.1f} s")


# --------------------------------------------------------------------------------------------
# Hypothesis: random interleavings of concurrent runs, random handler faults, random queue
# bounds. Whatever happens, each handler sees each run's events in order, never twice, and
# every event ends up counted exactly once.
#
# Runs are .stream() calls on threads and .astream() tasks on an event loop of their own
# thread, started together; consumers yield at random chunks to vary the interleaving.
# Tokens are unique per run (PacedFakeChatModel with no pause), so "never twice" and
# "in order" are exact checks.
# --------------------------------------------------------------------------------------------

FLUSH = 5.0

# Errors handler code raises by mistake. The async list leaves out GeneratorExit,
# KeyboardInterrupt and SystemExit: asyncio itself treats those specially, and they have
# dedicated tests (test_stop_stream.py) that keep them away from pytest's own loops.
SYNC_FAULTS: list[Callable[[], BaseException]] = [
    lambda: ValueError("bad value"),
    lambda: KeyError("missing"),
    lambda: asyncio.CancelledError(),
    lambda: StopIteration(),
    lambda: StopAsyncIteration(),
    lambda: GeneratorExit(),
    lambda: KeyboardInterrupt(),
    lambda: SystemExit(2),
]
ASYNC_FAULTS: list[Callable[[], BaseException]] = SYNC_FAULTS[:5]


@dataclass(frozen=True)
class Run:
    tag: str
    where: str  # "thread" (.stream) or "task" (.astream)
    tokens: int
    faults: frozenset[int]  # event positions (0 = start, 1.. = tokens, last = end) that raise
    yields: frozenset[int]  # chunk positions after which the consumer yields

    def expected(self) -> list[tuple[str, str | None]]:
        words = make_tokens(self.tokens, word=f"{self.tag}-")
        return [(START, None), *((TOKEN, w) for w in words), (END, None)]

    def model(self) -> PacedFakeChatModel:
        return PacedFakeChatModel(tokens=make_tokens(self.tokens, word=f"{self.tag}-"), interval=0)


@st.composite
def runs(draw: st.DrawFn, max_runs: int = 4, max_tokens: int = 8) -> list[Run]:
    count = draw(st.integers(1, max_runs))
    made = []
    for index in range(count):
        tokens = draw(st.integers(1, max_tokens))
        positions = st.integers(0, tokens + 1)
        made.append(
            Run(
                tag=f"r{index}",
                where=draw(st.sampled_from(["thread", "task"])),
                tokens=tokens,
                faults=frozenset(draw(st.lists(positions, max_size=3))),
                yields=frozenset(draw(st.lists(st.integers(0, tokens), max_size=3))),
            )
        )
    return made


class Chaos(BaseCallbackHandler):
    """Records (hook, token) per run, then raises if the run's position is a fault."""

    def __init__(self, faults: dict[str, frozenset[int]], error: Callable[[], BaseException]):
        self.faults = faults
        self.error = error
        self.received: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.raised = 0
        self._lock = threading.Lock()
        self.gate: threading.Event | None = None

    def event(self, hook: str, token: str | None, kwargs: dict[str, Any]) -> None:
        (tag,) = kwargs["tags"]
        with self._lock:
            position = len(self.received[tag])
            self.received[tag].append((hook, token))
            fault = position in self.faults.get(tag, frozenset())
            if fault:
                self.raised += 1
        if fault:
            raise self.error()

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.event(START, None, kwargs)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait(30)
        self.event(TOKEN, token, kwargs)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.event(END, None, kwargs)


class AsyncChaos(AsyncCallbackHandler):
    def __init__(self, faults: dict[str, frozenset[int]], error: Callable[[], BaseException]):
        self.inner = Chaos(faults, error)
        self.received = self.inner.received
        self.gate: threading.Event | None = None

    @property
    def raised(self) -> int:
        return self.inner.raised

    async def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        self.inner.event(START, None, kwargs)

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.001)
        self.inner.event(TOKEN, token, kwargs)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.inner.event(END, None, kwargs)


def drive(plan: list[Run], safes: list[Any], all_done: Callable[[], None] = lambda: None) -> None:
    """Run every stream of ``plan`` concurrently; returns once all have finished.

    ``all_done`` is called as soon as the last stream has ended (before any flush).
    """
    threaded = [run for run in plan if run.where == "thread"]
    tasked = [run for run in plan if run.where == "task"]
    parties = len(threaded) + (1 if tasked else 0)
    start = threading.Barrier(parties)
    errors: list[BaseException] = []
    finished = [0]
    lock = threading.Lock()

    def one_done() -> None:
        with lock:
            finished[0] += 1
            last = finished[0] == len(plan)
        if last:
            all_done()

    def stream(run: Run) -> None:
        try:
            start.wait(10)
            config = {"callbacks": safes, "tags": [run.tag]}
            for index, _ in enumerate(run.model().stream("hi", config=config)):
                if index in run.yields:
                    threading.Event().wait(0)  # give up the GIL: another thread may run
        except BaseException as exc:
            errors.append(exc)
        finally:
            one_done()

    async def astream(run: Run) -> None:
        config = {"callbacks": safes, "tags": [run.tag]}
        index = 0
        try:
            async for _ in run.model().astream("hi", config=config):
                if index in run.yields:
                    await asyncio.sleep(0)
                index += 1
        finally:
            one_done()

    async def tasks() -> None:
        await asyncio.gather(*(astream(run) for run in tasked))
        # Drain this loop's deliveries before asyncio.run closes it.
        for safe in safes:
            await safe.aflush(FLUSH)

    def loop_thread() -> None:
        try:
            start.wait(10)
            asyncio.run(tasks())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(run,)) for run in threaded]
    if tasked:
        threads.append(threading.Thread(target=loop_thread))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a stream never finished"
    assert not errors, errors


@pytest.mark.timeout(240)
@given(
    plan=runs(),
    sync_error=st.sampled_from(SYNC_FAULTS),
    async_error=st.sampled_from(ASYNC_FAULTS),
)
def test_faulty_handlers_see_every_run_in_order_and_account_for_all(
    plan: list[Run],
    sync_error: Callable[[], BaseException],
    async_error: Callable[[], BaseException],
) -> None:
    faults = {run.tag: run.faults for run in plan}
    handlers = [Chaos(faults, sync_error), AsyncChaos(faults, async_error)]
    safes = [harden(handler, breaker=None) for handler in handlers]
    drive(plan, safes)
    events = sum(run.tokens + 2 for run in plan)
    for handler, safe in zip(handlers, safes, strict=True):
        assert safe.flush(FLUSH)
        for run in plan:
            # Nothing skipped (no breaker), nothing dropped (room enough): all of it, in order.
            assert handler.received[run.tag] == run.expected(), run
        stats = safe.stats()
        assert stats.emitted == events
        expected_failures = sum(
            sum(1 for position in run.faults if position <= run.tokens + 1) for run in plan
        )
        assert handler.raised == expected_failures
        assert stats.failed == expected_failures, stats
        assert sum(stats.errors.values()) == expected_failures
        assert stats.delivered == events - expected_failures
        assert_accounted(stats)


def is_ordered_subset(got: list[Any], expected: list[Any]) -> bool:
    remaining = iter(expected)
    return all(item in remaining for item in got)  # consumes the iterator: order kept


@pytest.mark.timeout(240)
@given(
    plan=runs(max_runs=3, max_tokens=6),
    policy=st.sampled_from(["drop_newest", "drop_oldest", "block"]),
    max_queue=st.integers(1, 8),
    breaker=st.sampled_from([None, (2, 60.0)]),
)
def test_full_queues_keep_order_and_count_every_drop(
    plan: list[Run], policy: str, max_queue: int, breaker: tuple[int, float] | None
) -> None:
    faults = {run.tag: run.faults for run in plan}
    gate = threading.Event()
    handlers = [Chaos(faults, SYNC_FAULTS[0]), AsyncChaos(faults, ASYNC_FAULTS[0])]
    for handler in handlers:
        handler.gate = gate  # hold every token until all streams are done: queues fill up
    safes = [
        harden(h, max_queue=max_queue, on_full=policy, block_timeout=0.005, breaker=breaker)
        for h in handlers
    ]
    try:
        drive(plan, safes, all_done=gate.set)
    finally:
        gate.set()
    events = sum(run.tokens + 2 for run in plan)
    for handler, safe in zip(handlers, safes, strict=True):
        assert safe.flush(FLUSH)
        got_total = 0
        for run in plan:
            got = handler.received[run.tag]
            got_total += len(got)
            assert len(set(got)) == len(got), f"duplicate delivery: {got}"
            assert is_ordered_subset(got, run.expected()), (got, run.expected())
        stats = safe.stats()
        assert stats.emitted == events
        assert stats.delivered + stats.failed == got_total, stats  # what the handler saw
        assert stats.dropped + stats.skipped == events - got_total, stats
        # A run's end is kept beyond max_queue when no token can make room for it.
        assert stats.queue_high_water <= max_queue + 1 + len(plan), stats
        assert_accounted(stats)


def test_queue_high_water_never_falls_when_a_stuck_handlers_queue_is_closed() -> None:
    handler = harden(BlockingHandler(), mode="offload", max_queue=1_000)
    try:
        for _ in fake_chat_model(20).stream("hi", config={"callbacks": [handler]}):
            pass
        assert handler.entered.wait(5.0)
        before = safecallbacks.stats(handler).queue_high_water
        assert before >= 30  # the stuck handler let the queue fill up
        assert safecallbacks.close(handler, timeout=0.05) is False  # still stuck
        after = safecallbacks.stats(handler)
        assert after.queue_high_water >= before, (before, after)
        # Everything queued behind the stuck event was dropped; the stuck one is pending.
        assert after.queue_depth == 0 and after.pending == 1
        assert after.dropped == after.emitted - after.delivered - 1 > 0
    finally:
        handler.release()


def test_aclose_cutting_off_a_hung_async_delivery_is_a_drop_not_a_failure() -> None:
    entered = threading.Event()

    class Hangs(AsyncCallbackHandler):
        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            entered.set()
            await asyncio.Event().wait()  # its sink never answers

    handler = harden(Hangs(), mode="offload", timeout=60.0, exit_timeout=0.2)

    async def request() -> bool:
        async for _ in fake_chat_model(5).astream("hi", config={"callbacks": [handler]}):
            pass
        return await safecallbacks.aclose(handler, timeout=0.1)

    assert asyncio.run(request()) is False  # the loop then shuts down, cancelling delivery
    assert entered.is_set()
    stats = safecallbacks.stats(handler)
    assert stats.failed == 0 and dict(stats.errors) == {}, stats
    assert stats.delivered == 0 and stats.dropped == stats.emitted == 9, stats
    assert_accounted(stats)


# --- hooks that are not plain functions ---------------------------------------------

PARTIAL_SEEN: list[str] = []


def _note(prefix: str, token: str, **kwargs: Any) -> None:
    PARTIAL_SEEN.append(prefix + token)


class PartialHook(BaseCallbackHandler):
    on_llm_new_token = functools.partial(_note, "p:")  # called as LangChain calls it: unbound


class CallableObject:
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def __call__(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class CallableHook(BaseCallbackHandler):
    on_llm_new_token = CallableObject()


class BrokenDescriptor:
    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self
        raise RuntimeError("cannot resolve this hook")

    def __call__(self, *args: Any, **kwargs: Any) -> None:  # makes it a hook to LangChain
        return None


class BrokenHook(BaseCallbackHandler):
    on_llm_new_token = BrokenDescriptor()


@pytest.mark.parametrize("mode", ["offload", "inline"])
def test_a_hook_that_is_not_a_function_is_delivered_as_bare_delivers_it(mode: str) -> None:
    PARTIAL_SEEN.clear()
    CallableHook.on_llm_new_token.tokens.clear()
    bare = [PartialHook(), CallableHook()]
    list(fake_chat_model(3).stream("hi", config={"callbacks": bare}))
    expected = (list(PARTIAL_SEEN), list(CallableHook.on_llm_new_token.tokens))
    assert len(expected[0]) == len(expected[1]) == 5
    PARTIAL_SEEN.clear()
    CallableHook.on_llm_new_token.tokens.clear()
    hardened = [harden(PartialHook(), mode=mode), harden(CallableHook(), mode=mode)]
    list(fake_chat_model(3).stream("hi", config={"callbacks": hardened}))
    for handler in hardened:
        assert safecallbacks.flush(handler, 5.0)
        stats = safecallbacks.stats(handler)
        assert (stats.delivered, stats.failed, stats.pending) == (5, 0, 0)
    assert (PARTIAL_SEEN, CallableHook.on_llm_new_token.tokens) == expected


@pytest.mark.parametrize("mode", ["offload", "inline"])
def test_a_hook_that_cannot_be_resolved_counts_its_events_failed_never_lost(mode: str) -> None:
    handler = harden(BrokenHook(), mode=mode)
    list(fake_chat_model(3).stream("hi", config={"callbacks": [handler]}))
    assert safecallbacks.flush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert (stats.failed, stats.pending) == (5, 0)
    assert_accounted(stats)


class SleepsAsync(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        await asyncio.sleep(0.002)
        self.tokens.append(token)


async def stream_and_return(handler: Any, emitted: list[str]) -> None:
    async for chunk in fake_chat_model(20).astream("hi", config={"callbacks": [handler]}):
        emitted.append(str(chunk.content))
    # Returning without aflush(): asyncio.run cancels the consumer mid-delivery.


@pytest.mark.timeout(120)
def test_asyncio_run_ending_mid_delivery_leaves_no_hole_in_the_sequence() -> None:
    holes = 0
    for _ in range(24):
        handler = SleepsAsync()
        safe = harden(handler, exit_timeout=1.0, breaker=None, settle=0)
        emitted: list[str] = []
        asyncio.run(stream_and_return(safe, emitted))
        stats = safe.stats()
        assert stats.pending == 0, stats
        assert stats.delivered + stats.failed + stats.dropped == stats.emitted, stats
        holes += handler.tokens != emitted[: len(handler.tokens)]
    assert holes == 0, f"{holes} of 24 runs delivered tokens after a dropped one"


# --- Ctrl-C while emitting ---------------------------------------------------------------


def interrupting_once(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step``, then a KeyboardInterrupt as if Ctrl-C landed right after it (main thread)."""
    armed = [True]

    def interrupted(*args: Any) -> Any:
        result = step(*args)
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = False
            raise KeyboardInterrupt
        return result

    return interrupted


class CountsThenInterrupted:
    """Stands in for a lane's ``emitted`` counter: counts, then Ctrl-C lands."""

    def __init__(self, counter: Any) -> None:
        self.step = interrupting_once(lambda: next(counter))

    def __next__(self) -> int:
        return int(self.step())


@pytest.mark.parametrize("where", ["counting", "stamping", "scheduling"])
def test_ctrl_c_while_emitting_never_wedges_a_handler(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = RecordingHandler()
    safe = harden(handler, mode="offload", settle=0, breaker=None)
    run_id = uuid.uuid4()
    safe.on_llm_new_token("first", run_id=run_id)
    assert safe.flush(5)
    lane = engine_of(safe).fast_lane
    assert lane is not None
    assert wait_until(lambda: not lane.scheduled)  # idle: the next event schedules it
    if where == "counting":
        monkeypatch.setattr(lane, "emitted", CountsThenInterrupted(lane.emitted))
    elif where == "stamping":
        monkeypatch.setattr(_hardened, "monotonic", interrupting_once(time.monotonic))
    else:
        monkeypatch.setattr(_workers, "_now", interrupting_once(time.monotonic))
    with pytest.raises(KeyboardInterrupt):
        safe.on_llm_new_token("interrupted", run_id=run_id)
    monkeypatch.undo()
    safe.on_llm_new_token("after", run_id=run_id)
    assert safe.flush(2), f"the lane is wedged: {safe.stats()!r}"
    assert_accounted(safe.stats())
    assert [token_of(c) for c in handler.calls][-1] == "after"


def signalling_once(step: Callable[..., Any]) -> Callable[..., Any]:
    """A real Ctrl-C (SIGINT) raised as ``step`` starts, on the main thread: Python
    handles it at its next chance, unless the code running holds interrupts back."""
    armed = [True]

    def signalled(*args: Any, **kwargs: Any) -> Any:
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = False
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    return signalled


class SignallingLookups(dict[Any, Any]):
    """A dict whose first ``get`` on the main thread raises a real SIGINT (see above)."""

    def __init__(self, items: dict[Any, Any]) -> None:
        super().__init__(items)
        self.armed = True

    def get(self, key: Any, default: Any = None) -> Any:
        if self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            signal.raise_signal(signal.SIGINT)
        return super().get(key, default)


def interrupted_before(step: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C as ``step`` is called (main thread), before it does anything; once."""
    armed = [True]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = False
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    return interrupted


def assert_unwedged(safe: Any, handler: RecordingHandler, run_id: uuid.UUID) -> None:
    """After an interrupt: a flush succeeds, later events are delivered, every event counted."""
    assert safe.flush(5), f"the handler is wedged: {safe.stats()!r}"
    safe.on_llm_new_token("after", run_id=run_id)
    safe.on_llm_end(LLMResult(generations=[]), run_id=run_id)
    assert safe.flush(5), f"the handler is wedged: {safe.stats()!r}"
    assert_accounted(safe.stats())
    assert "after" in [token_of(c) for c in handler.hooks(TOKEN)]


@pytest.mark.parametrize("where", ["stamping", "marking", "queueing the mark"])
def test_ctrl_c_while_a_run_starts_never_leaves_an_event_pending(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run's start takes the slow path (Engine.record): it marks the run for routing.
    handler = RecordingHandler()
    safe = harden(handler, mode="offload", settle=0, breaker=None)
    safe.on_llm_new_token("first", run_id=uuid.uuid4())
    assert safe.flush(5)
    lane = engine_of(safe).fast_lane
    assert lane is not None
    if where == "stamping":
        monkeypatch.setattr(_dispatch, "_now", interrupting_once(time.monotonic))
    elif where == "marking":
        monkeypatch.setattr(_dispatch, "emitter_key", interrupting_once(emitter_key))
    else:
        monkeypatch.setattr(lane, "_controls_in", CountsThenInterrupted(lane._controls_in))
    with pytest.raises(KeyboardInterrupt):
        safe.on_llm_start({}, ["hi"], run_id=uuid.uuid4())
    monkeypatch.undo()
    run_id = uuid.uuid4()
    safe.on_llm_start({}, ["hi"], run_id=run_id)
    assert_unwedged(safe, handler, run_id)
    assert lane.events_queued() == 0 and len(lane.queue) == 0


ON_FULL_INTERRUPTS = [
    ("drop_oldest", "routing"),  # a real SIGINT as the queue is routed, under the router's lock
    ("drop_oldest", "shedding"),  # a real SIGINT as a token is shed to make room
    ("drop_newest", "measuring"),  # Ctrl-C as a token finds the queue full
    ("block", "waiting"),  # Ctrl-C while waiting for room
]


@pytest.mark.parametrize(("policy", "where"), ON_FULL_INTERRUPTS)
def test_ctrl_c_while_a_full_queue_makes_room_never_leaves_an_event_pending(
    policy: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = BlockingHandler()
    options: dict[str, Any] = {"max_queue": 4, "on_full": policy, "block_timeout": 0.01}
    safe = harden(handler, mode="offload", settle=0, breaker=None, **options)
    lane = engine_of(safe).fast_lane
    assert lane is not None
    run_id = uuid.uuid4()
    safe.on_llm_start({}, ["hi"], run_id=run_id)
    safe.on_llm_new_token("held", run_id=run_id)
    assert handler.entered.wait(5)  # the worker is inside it: what follows waits, unrouted
    for i in range(8):
        safe.on_llm_new_token(str(i), run_id=run_id)
    router = lane.router
    if where == "routing":
        # Each queued event's run is looked up as it is routed: the signal comes between
        # taking the event off the queue and appending it to its run's strand.
        router.runs = SignallingLookups(router.runs)
    elif where == "shedding":
        monkeypatch.setattr(router, "shed_token", signalling_once(router.shed_token))
    elif where == "measuring":
        monkeypatch.setattr(lane, "backlog", interrupting_once(lane.backlog))
    else:
        monkeypatch.setattr(lane, "_wait_for_space", interrupting_once(lane._wait_for_space))
    try:
        with pytest.raises(KeyboardInterrupt):
            for i in range(8):  # the queue has room again now and then: until it is full
                safe.on_llm_new_token(f"interrupted {i}", run_id=run_id)
        monkeypatch.undo()
    finally:
        handler.release()
    assert_unwedged(safe, handler, run_id)


def test_ctrl_c_while_a_sync_handler_is_taken_over_never_wedges_its_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker parks a lane whose handler failed in a thread-bound way; the emitter takes
    # it over (Engine.take_over). Cut off once the lane is claimed, it is released anyway.
    handler = RecordingHandler()
    safe = harden(handler, mode="offload", settle=0, breaker=None)
    run_id = uuid.uuid4()
    safe.on_llm_start({}, ["hi"], run_id=run_id)
    safe.on_llm_new_token("first", run_id=run_id)
    assert safe.flush(5)
    engine = engine_of(safe)
    lane = engine._thread_lane
    pool = _workers.pool()
    assert wait_until(lambda: lane in pool.lingering)
    with pool.lock:
        lane.parked = True  # as a worker parks it
    safe.on_llm_new_token("queued", run_id=run_id)  # left to the emitter
    engine.request_mode("inline", "thread-bound failure", trial=True)
    monkeypatch.setattr(engine, "switch_mode", interrupting_once(engine.switch_mode))
    with pytest.raises(KeyboardInterrupt):
        safe.on_llm_new_token("interrupted", run_id=run_id)
    monkeypatch.undo()
    assert_unwedged(safe, handler, run_id)
    assert "queued" in [token_of(c) for c in handler.hooks(TOKEN)]


@pytest.mark.parametrize("where", ["before scheduling", "after scheduling"])
def test_ctrl_c_while_an_async_handlers_lane_is_kicked_never_wedges_it(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = AsyncRecordingHandler()
    safe = harden(handler, mode="offload", settle=0, breaker=None)
    run_id = uuid.uuid4()
    safe.on_llm_new_token("first", run_id=run_id)  # from sync code: the background loop
    assert safe.flush(5)
    lane = engine_of(safe)._loop_lane(None)
    assert wait_until(lambda: not lane.scheduled)  # idle: the next event kicks it
    loop = lane.loop
    assert loop is not None
    wrap = interrupted_before if where == "before scheduling" else interrupting_once
    monkeypatch.setattr(loop, "call_soon_threadsafe", wrap(loop.call_soon_threadsafe))
    with pytest.raises(KeyboardInterrupt):
        safe.on_llm_new_token("interrupted", run_id=run_id)
    monkeypatch.undo()
    safe.on_llm_new_token("after", run_id=run_id)
    assert safe.flush(5), f"the lane is wedged: {safe.stats()!r}"
    assert_accounted(safe.stats())
    assert [token_of(c) for c in handler.calls][-1] == "after"


@pytest.mark.parametrize("waiting", ["settle", "flush"])
def test_ctrl_c_while_waiting_for_a_backlog_leaves_nothing_behind(
    waiting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing is counted on the waiting side: the barrier stays queued and is released by
    # the delivery that reaches it, so a later flush still settles everything.
    handler = BlockingHandler()
    safe = harden(handler, mode="offload", settle=5.0 if waiting == "settle" else 0, breaker=None)
    run_id = uuid.uuid4()
    safe.on_llm_start({}, ["hi"], run_id=run_id)
    safe.on_llm_new_token("held", run_id=run_id)
    assert handler.entered.wait(5)
    monkeypatch.setattr(Barrier, "wait", interrupting_once(Barrier.wait))
    with pytest.raises(KeyboardInterrupt):
        if waiting == "settle":
            safe.on_llm_end(LLMResult(generations=[]), run_id=run_id)  # a root run's end waits
        else:
            safe.flush(5)
    monkeypatch.undo()
    handler.release()
    run_id = uuid.uuid4()
    safe.on_llm_start({}, ["hi"], run_id=run_id)
    assert_unwedged(safe, handler, run_id)


class Signals:
    """Ctrl-C (a real SIGINT) right after the ``nth`` call of ``step`` returns (main thread)."""

    def __init__(self, step: Callable[..., Any], nth: int) -> None:
        self.step, self.left = step, nth

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_signal(self.step(*args, **kwargs))

    def __next__(self) -> int:  # stands in for a counter
        return int(self._then_signal(next(self.step)))

    def __repr__(self) -> str:  # a counter is read through its repr (count_value)
        return repr(self.step)

    def _then_signal(self, result: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            self.left -= 1
            if self.left == 0:
                signal.raise_signal(signal.SIGINT)
        return result


SLOW_PATH_SEAMS = (
    "emitted", "controls", "stamp", "context", "emitter", "backlog", "note_depth", "kick",
    "pump", "route", "shed_token", "scope_of", "wait_for_space",
)  # fmt: skip


@given(
    seam=st.sampled_from(SLOW_PATH_SEAMS),
    nth=st.integers(1, 6),
    policy=st.sampled_from(["drop_newest", "drop_oldest", "block"]),
    tokens=st.integers(0, 6),
)
@settings(max_examples=40, deadline=None)
def test_ctrl_c_anywhere_on_the_slow_path_leaves_every_event_accounted(
    seam: str, nth: int, policy: str, tokens: int
) -> None:
    handler = BlockingHandler()
    options: dict[str, Any] = {"max_queue": 4, "on_full": policy, "block_timeout": 0.002}
    safe = harden(handler, mode="offload", settle=0, breaker=None, **options)
    lane = engine_of(safe).fast_lane
    assert lane is not None
    run_id = uuid.uuid4()
    safe.on_llm_start({}, ["hi"], run_id=run_id)
    safe.on_llm_new_token("held", run_id=run_id)
    assert handler.entered.wait(5)
    for i in range(tokens):
        safe.on_llm_new_token(str(i), run_id=run_id)
    router = lane.router
    seams: dict[str, tuple[Any, str]] = {
        "emitted": (lane, "emitted"),
        "controls": (lane, "_controls_in"),
        "stamp": (_dispatch, "_now"),
        "context": (_dispatch, "_copy_context"),
        "emitter": (_dispatch, "emitter_key"),
        "backlog": (lane, "backlog"),
        "note_depth": (lane, "note_depth"),
        "kick": (lane, "kick"),
        "pump": (router, "pump"),
        "route": (router, "_route"),
        "shed_token": (router, "shed_token"),
        "scope_of": (router, "scope_of"),
        "wait_for_space": (lane, "_wait_for_space"),
    }
    owner, name = seams[seam]
    original = getattr(owner, name)
    setattr(owner, name, Signals(original, nth))
    try:
        for i in range(4):  # a child run, tokens and its end: every slow path once or more
            for event in range(4):
                try:
                    if event == 0:
                        child = uuid.uuid4()
                        safe.on_llm_start({}, ["hi"], run_id=child, parent_run_id=run_id)
                    elif event < 3:
                        safe.on_llm_new_token(f"{i}.{event}", run_id=child)
                    else:
                        safe.on_llm_end(LLMResult(generations=[]), run_id=child)
                except KeyboardInterrupt:
                    pass
    finally:
        setattr(owner, name, original)
        handler.release()
    assert_unwedged(safe, handler, run_id)
