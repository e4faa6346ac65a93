"""Async delivery: one consumer task per (handler, loop), and the background loop.

Handlers whose hooks are all ``async def`` are delivered on the event loop
that emitted the event, where their clients and sessions live; events from
plain sync code go to one shared background loop. The consumer steps each
handler coroutine inside itself (no task per event) and lingers across short
gaps, so a paced stream costs one consumer task, not one per token; a strand
(``_runs``) whose delivery suspends goes on in a task of its own, so up to
``max_concurrency`` emitters' deliveries await at once. When a
loop shuts down, what fits in the exit budget is delivered and the rest is
counted as dropped. On the token path: ``LoopLane.kick`` schedules the
consumer when the lane goes from idle to busy, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ._compat import fork_safe, get_running_loop
from ._hooks import END_HOOKS, PAIRED_HOOKS, START_HOOKS
from ._interrupts import held_interrupts
from ._isolation import first_step
from ._observe import Batch
from ._queue import CONSUMER_TASKS, LINGER_SECONDS, POLL_SECONDS, Lane, LaneOwner
from ._runs import Strand, note_dropped

_now = time.monotonic
RUN_HOOKS = START_HOOKS | END_HOOKS | PAIRED_HOOKS  # hooks with run bookkeeping to do
COMMIT_EVERY = 256  # deliveries per committed batch on a loop lane
YIELD_EVERY = 512  # deliveries without a suspension after which the consumer yields
MANY = 64  # strands claimed at once while deliveries are quick


class LoopLane(Lane):
    """Drained on one event loop (the emitter's, or the background one).

    One consumer task routes the lane and delivers each strand's events, stepping
    the handler's coroutines itself; a strand whose delivery suspends continues
    in a task of its own (``_carry_on``), so up to ``max_concurrency`` strands
    await at once, as the tasks that emitted them would have awaited bare.
    """

    # Tasks on the emitting loop cost no thread: bare, every stream awaits the handler in
    # its own task, so the bound is set well above the streams one loop usually serves.
    default_concurrency = 256

    def __init__(
        self, engine: LaneOwner, loop: asyncio.AbstractEventLoop, background: bool
    ) -> None:
        super().__init__(engine)
        self.loop = loop
        self.background = background
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._carriers: set[asyncio.Task[None]] = set()
        # Carriers whose first step has not run: cancelled before it (a loop shutting
        # down in the iteration that made them), they would never pass the cancellation
        # into the handler they carry; ``_salvage`` takes their deliveries over.
        self._unstarted: dict[asyncio.Task[None], tuple[Strand, Awaitable[None], float]] = {}

    def _may_block(self) -> bool:
        # Blocking the loop that must drain this lane could never make room.
        return get_running_loop() is not self.loop

    def kick(self) -> None:
        loop = self.loop
        assert loop is not None
        here = get_running_loop() is loop  # may be cut off (Ctrl-C): nothing done yet
        with self._lock:
            if self.scheduled:
                return
            self.scheduled = True
        try:
            if here:
                loop.call_soon(self._start)
            else:
                loop.call_soon_threadsafe(self._start)
        except RuntimeError:  # the loop is closed: nothing will ever drain it
            self.scheduled = False
            self.discard_all("loop_closed")
        except BaseException:
            # Ctrl-C while scheduling: whether the consumer was scheduled is unknown, so
            # the lane is not marked scheduled and the next event or flush kicks again
            # (a second ``_start`` finds the consumer running and does nothing).
            self.scheduled = False
            raise

    def _start(self) -> None:
        assert self.loop is not None
        task = self._task
        if task is not None and not task.done():
            self.scheduled = True  # kicked twice (an interrupted kick): one consumer
            return
        # Held here: the loop keeps only a weak reference to its tasks.
        self._task = self.loop.create_task(self._consume())
        CONSUMER_TASKS.add(self._task)

    def _unschedule(self) -> bool:
        with self._lock:
            self.scheduled = False
            if self.queue or self._carriers:
                self.scheduled = True
                return False
            return True

    async def _consume(self) -> None:
        try:
            quiet_since = _now()
            while True:
                try:
                    did = await self._dispatch()
                except Exception as exc:  # our own bug: never let it wedge the lane
                    did = False
                    self.engine.observer.announce_once(
                        "internal", "internal_error", error_type=type(exc).__qualname__
                    )
                if did and self.queue and not self.router.slow():
                    await asyncio.sleep(0)  # more came meanwhile: take it, after the others
                    continue
                if did or self.queue or self._carriers:
                    quiet_since = _now()
                elif _now() - quiet_since >= LINGER_SECONDS and self._unschedule():
                    return
                # Stay a moment for the next event (a paced stream's next token), as
                # thread lanes do, so a stream costs one consumer task, not one per token.
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:
            # The loop is shutting down (asyncio.run cancels leftover tasks and
            # then waits for them): deliver what fits in the exit budget.
            await self._salvage()
            raise

    async def _dispatch(self) -> bool:
        """Deliver every runnable strand; True when there was something to do."""
        router = self.router
        calls: dict[str, Callable[..., Any]] = {}  # resolved once per dispatch
        did = False
        delivered = 0
        done: list[Strand] = []  # delivered, released with the next claim
        waiting: deque[Strand] = deque()  # claimed, not begun
        began = _now()
        try:
            while True:
                many = 1 if router.slow() else MANY
                claimed = router.claim(self.concurrency, done, _now() - began, many)
                done = []
                if not claimed:
                    return did
                did = True
                began = _now()
                waiting.extend(claimed)
                while waiting:
                    strand = waiting.popleft()
                    started = _now()
                    rest = self._deliver(strand, calls)
                    delivered += strand.taken
                    if rest is None:
                        done.append(strand)
                    elif len(self._carriers) + 1 < self.concurrency:
                        self._carry_apart(strand, rest, started)
                    else:
                        # As many deliveries in flight as allowed (this one included):
                        # finished here before the next strand is begun.
                        await self._carry_on(strand, rest, started)
                if delivered >= YIELD_EVERY:
                    # Handlers that never suspend would otherwise hold this loop for a
                    # whole backlog: let the streams it serves move on meanwhile.
                    delivered = 0
                    await asyncio.sleep(0)
        finally:
            for strand in done:
                self._released(strand, began)
            for strand in waiting:  # cut off before they were begun: back in their strands
                self.router.release(strand, resize=False)
            if self._space_waiters:
                self._popped()

    def _carry_apart(self, strand: Strand, rest: Awaitable[None], started: float) -> None:
        """A suspended delivery goes on in a task of its own while other strands are begun."""
        carrier = self._carrier(strand, rest, started)
        self._carriers.add(carrier)
        self._unstarted[carrier] = (strand, rest, started)
        carrier.add_done_callback(self._carriers.discard)

    def _carrier(self, strand: Strand, rest: Awaitable[None], started: float) -> asyncio.Task[None]:
        carrier = asyncio.get_running_loop().create_task(self._carry_on(strand, rest, started))
        CONSUMER_TASKS.add(carrier)
        return carrier

    def _released(self, strand: Strand, began: float) -> None:
        self.router.release(strand, _now() - began)
        if self._space_waiters:
            self._popped()

    async def _carry_on(self, strand: Strand, suspended: Awaitable[None], began: float) -> None:
        """Finish a suspended delivery, then the rest of its strand's chunk, in this task."""
        this = asyncio.current_task()
        if this is not None:
            self._unstarted.pop(this, None)  # (the consumer itself carries on without one)
        calls: dict[str, Callable[..., Any]] = {}
        rest: Awaitable[None] | None = suspended
        try:
            while rest is not None:
                await rest
                rest = self._deliver(strand, calls)
        finally:
            self._released(strand, began)

    def _deliver(
        self, strand: Strand, calls: dict[str, Callable[..., Any]]
    ) -> Awaitable[None] | None:
        """Deliver a strand's chunk until a delivery suspends: then what must be awaited.

        The common case (a hook that finishes in its first step, nothing for the
        breaker or the run bookkeeping to do) stays in this loop.
        """
        chunk = strand.chunk
        engine = self.engine
        router = self.router
        observer = engine.observer
        breaker = observer.breaker
        batch = strand.batch
        durations, lags, hooks = batch.durations, batch.lags, batch.hooks
        while True:
            try:
                entry = chunk.popleft()
            except IndexError:
                return None  # committed at COMMIT_EVERY, a barrier, or when the strand goes
            if entry.__class__ is not tuple:
                batch = observer.commit(batch, strand)
                durations, lags, hooks = batch.durations, batch.lags, batch.hooks
                router.reached(entry, strand)
                continue
            hook, args, kwargs, context, emitted_at, _ = entry
            call = calls.get(hook)
            if call is None:
                call = calls[hook] = engine.async_call(hook)
            if hook not in RUN_HOOKS and not breaker.consecutive and not engine.failing:
                started = _now()
                strand.busy_since, strand.inflight = started, hook
                step = first_step(call, args, kwargs, context)
                if step is None:
                    strand.busy_since = strand.inflight = None
                    durations.append(_now() - started)
                    lags.append(started - emitted_at)
                    hooks.append(hook)
                    if len(hooks) >= COMMIT_EVERY:
                        batch = observer.commit(batch, strand)
                        durations, lags, hooks = batch.durations, batch.lags, batch.hooks
                    continue
                rest = engine.finish_async(self, strand, entry, batch, step, started)
            else:
                rest = engine.deliver_now(self, strand, entry, batch, calls)
            if rest is not None:
                return rest  # settles into strand.batch: nothing commits it meanwhile

    async def _salvage(self) -> None:
        # An event whose delivery the shutdown cut off is counted dropped: delivering the
        # ones after it would leave a hole in the handler's sequence, so they go with it.
        budget = 0.0 if self.cut_off else self.engine.options.exit_timeout
        deadline = _now() + budget
        for carrier in list(self._carriers):
            carrier.cancel()
        try:
            await self._take_over_unstarted()
            while _now() < deadline and not self.cut_off:
                claimed = self.router.claim(1)
                if not claimed:
                    break
                strand = claimed[0]
                try:
                    for entry in list(strand.chunk):
                        strand.chunk.popleft()
                        if entry.__class__ is not tuple:
                            self.router.reached(entry, strand)
                            continue
                        batch = Batch()
                        try:  # cut off by the deadline, deliver_async counts it as dropped
                            await asyncio.wait_for(
                                self.engine.deliver_async(self, strand, entry, batch),
                                max(deadline - _now(), 0.0),
                            )
                        finally:
                            self.engine.observer.commit(batch, scope=strand.scope)
                finally:
                    self.router.release(strand)
        except (TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.discard_all("loop_closed")
            self.cut_off = False
            self.scheduled = False

    async def _take_over_unstarted(self) -> None:
        """Carry the deliveries of carriers cancelled before their first step, then cancel
        them as a started carrier is: the handler gets the shutdown's cancellation (and the
        exit budget to finish), not a coroutine closed by the garbage collector."""
        unstarted, self._unstarted = self._unstarted, {}
        if not unstarted:
            return
        carriers = [self._carrier(*taken) for taken in unstarted.values()]
        await asyncio.sleep(0)  # their first steps run: each handler's await is its own
        for carrier in carriers:
            carrier.cancel()
        # Not among the tasks asyncio.run waits for: waited for here, all together, as long
        # as a handler's grace after the cancellation (drive_rest closes it then), and a
        # little more for that to land.
        await asyncio.wait(carriers, timeout=self.engine.options.exit_timeout + 0.1)

    def reap_if_dead(self) -> None:
        """A closed loop will never drain this lane: count what is left as dropped."""
        loop = self.loop
        if loop is not None and loop.is_closed():
            with held_interrupts():  # (a flush waiting on the main thread) counted once
                self._reap()

    def _reap(self) -> None:
        """Account for what a closed loop left: finished, cut off, queued."""
        observer = self.engine.observer
        for strand in list(self.router.strands.values()):
            # Deliveries its consumers finished but never committed are counted as done.
            observer.commit(strand.batch, strand)
        for strand in self.router.busy_strands():
            if strand.inflight is not None:  # its task died with the loop
                observer.dropped(strand.inflight, reason="loop_closed")
                note_dropped(strand, strand.inflight)
                strand.busy_since = strand.inflight = None
            dropped = [e[0] for e in strand.chunk if e.__class__ is tuple]
            for entry in strand.chunk:
                if entry.__class__ is not tuple:
                    self.router.reached(entry, strand)
            strand.chunk.clear()
            for hook in dropped:
                observer.dropped(hook, reason="loop_closed")
                note_dropped(strand, hook)
            self.router.release(strand)
        self.discard_all("loop_closed")


# --- the shared background loop -------------------------------------------------

_BACKGROUND: asyncio.AbstractEventLoop | None = None
_BACKGROUND_LOCK = fork_safe(threading.Lock())


def background_loop() -> asyncio.AbstractEventLoop:
    """One long-lived loop for async hooks whose events came from plain sync code."""
    global _BACKGROUND
    found = _BACKGROUND
    if found is not None and not found.is_closed():
        return found
    with _BACKGROUND_LOCK:
        if _BACKGROUND is None or _BACKGROUND.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=run, name="safecallbacks-loop", daemon=True).start()
            started.wait(5.0)
            _BACKGROUND = loop
        return _BACKGROUND


def _reset_after_fork() -> None:
    """The parent's background loop thread does not exist in a forked child."""
    global _BACKGROUND
    _BACKGROUND = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
