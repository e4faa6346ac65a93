"""Offload mode, queue side: the bound, the ``on_full`` policies, timeouts, flush and close.

A handler parked on an ``Event`` holds its queue still, so which events are kept and which
are dropped is exact, not statistical. Every drop must show up in ``stats()``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from safecallbacks import harden
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    RecordingHandler,
    assert_accounted,
    async_wait_until,
    fake_chat_model,
    wait_until,
)
from tests._offload_support import (
    END,
    START,
    TOKEN,
    AsyncBlockingHandler,
    chunk_count,
    expected_hooks,
    gate_releaser,
    hooks_of,
    tokens_of,
)

pytestmark = pytest.mark.timeout(60)

WORDS = 20
CHUNKS = chunk_count(WORDS)  # 39
EVENTS = CHUNKS + 2
MAX_QUEUE = 10
KINDS = ["sync", "async"]
# The handler parks in token 0; the 38 later tokens and on_llm_end then meet a full queue.
BEHIND = CHUNKS - 1 + 1
MARGIN = 0.75  # slack for "returns within its timeout" on a loaded 2-core machine


@pytest.fixture
def releases() -> Iterator[list[Any]]:
    yield from gate_releaser([])


def blocker(kind: str, after: int = 0) -> BlockingHandler | AsyncBlockingHandler:
    return BlockingHandler(after=after) if kind == "sync" else AsyncBlockingHandler(after=after)


def stream_parked(safe: Any, stuck: Any, words: int = WORDS) -> list[str]:
    """Stream; at the first chunk wait until the handler is parked in token 0, then go on."""
    chunks = []
    for chunk in fake_chat_model(words).stream("hi", config={"callbacks": [safe]}):
        if not chunks:
            assert stuck.entered.wait(10), "the handler never parked"
        chunks.append(str(chunk.content))
    return chunks


async def astream_parked(safe: Any, stuck: Any, words: int = WORDS) -> list[str]:
    chunks = []
    async for chunk in fake_chat_model(words).astream("hi", config={"callbacks": [safe]}):
        if not chunks:
            assert await async_wait_until(stuck.entered.is_set, 10), "the handler never parked"
        chunks.append(str(chunk.content))
    return chunks


# --------------------------------------------------------------------------------------------
# on_full="drop_newest" / "drop_oldest"
# --------------------------------------------------------------------------------------------


def expect_kept(policy: str, chunks: list[str]) -> tuple[list[str], bool]:
    """(the tokens the handler ends up with, whether on_llm_end survives)."""
    if policy == "drop_newest":
        return chunks[: 1 + MAX_QUEUE], False  # token 0 (in hand) and the first N queued
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
    assert tokens_of(stuck.calls) == chunks[:4]  # the one in hand and the first three queued
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
    assert tokens_of(stuck.calls) == chunks[:4]
    assert_accounted(safe.stats())


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
# flush and close
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


def recorder(kind: str) -> RecordingHandler | AsyncRecordingHandler:
    return RecordingHandler() if kind == "sync" else AsyncRecordingHandler()


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
