"""Offload mode, delivery side: what a handler receives, where, in which context, and that
the stream never waits for it.

Every property is checked on ``.stream()`` and ``.astream()`` with a sync and an async
handler. Streams come from langchain-core's ``GenericFakeChatModel``; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableGenerator

from safecallbacks import harden
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    RecordingHandler,
    assert_accounted,
    async_wait_until,
    fake_chat_model,
)
from tests._offload_support import (
    END,
    PROBE,
    START,
    TOKEN,
    AsyncBlockingHandler,
    AsyncProbe,
    SyncProbe,
    by_run,
    chunk_count,
    expected_hooks,
    gate_releaser,
    hooks_of,
    tokens_of,
)

pytestmark = pytest.mark.timeout(60)

WORDS = 20
CHUNKS = chunk_count(WORDS)  # 39: the words and the spaces between them
EVENTS = CHUNKS + 2  # plus on_chat_model_start and on_llm_end
KINDS = ["sync", "async"]
WATCHDOG = 15.0  # a test that would otherwise hang releases its handler after this long


@pytest.fixture
def releases() -> Iterator[list[Any]]:
    """Blocking handlers appended here are released at teardown, whatever happened."""
    yield from gate_releaser([])


def recorder(kind: str) -> RecordingHandler | AsyncRecordingHandler:
    return RecordingHandler() if kind == "sync" else AsyncRecordingHandler()


def probe(kind: str) -> SyncProbe | AsyncProbe:
    return SyncProbe() if kind == "sync" else AsyncProbe()


def blocker(kind: str, after: int) -> BlockingHandler | AsyncBlockingHandler:
    return BlockingHandler(after=after) if kind == "sync" else AsyncBlockingHandler(after=after)


def watchdog(handler: BlockingHandler | AsyncBlockingHandler) -> threading.Timer:
    """Release ``handler`` after WATCHDOG seconds so a broken library fails instead of hanging."""
    timer = threading.Timer(WATCHDOG, handler.release)
    timer.daemon = True
    timer.start()
    return timer


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
# Context variables
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


def check_complete(handler: Any, chunks: list[str]) -> None:
    assert hooks_of(handler.calls) == expected_hooks(CHUNKS)
    assert tokens_of(handler.calls) == chunks


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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_hung_handler_does_not_starve_another_in_a_fresh_pool(tmp_path: Path) -> None:
    """Each round runs in a forked child, so it starts with an empty worker pool.

    The first deliveries of a process are where the pool has the fewest workers: the one
    that picks up the hung handler must not leave the other handler's lane unattended.
    """
    script = tmp_path / "fresh_pool.py"
    script.write_text(textwrap.dedent(FRESH_POOL_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), "30"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


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
