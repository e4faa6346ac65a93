"""Hypothesis: random interleavings of concurrent runs, random handler faults, random
queue bounds. Whatever happens, each handler sees each run's events in order, never twice,
and every event ends up counted exactly once.

Runs are ``.stream()`` calls on threads and ``.astream()`` tasks on an event loop of their
own thread, started together; consumers yield at random chunks to vary the interleaving.
Tokens are unique per run (``PacedFakeChatModel`` with no pause), so "never twice" and
"in order" are exact checks.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from safecallbacks import harden
from safecallbacks._paced import PacedFakeChatModel, make_tokens
from safecallbacks.testing import assert_accounted

pytestmark = pytest.mark.timeout(240)

START, TOKEN, END = "on_chat_model_start", "on_llm_new_token", "on_llm_end"
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


# --------------------------------------------------------------------------------------------
# Faults: every event delivered once, in order, failures counted
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Bounded queues: what survives is still in order, never duplicated, and all is counted
# --------------------------------------------------------------------------------------------


def is_ordered_subset(got: list[Any], expected: list[Any]) -> bool:
    remaining = iter(expected)
    return all(item in remaining for item in got)  # consumes the iterator: order kept


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
        assert stats.queue_high_water <= max_queue + 1, stats
        assert_accounted(stats)
