"""Async delivery: one consumer task per (handler, loop), and the background loop.

Handlers whose hooks are all ``async def`` are delivered on the event loop
that emitted the event, where their clients and sessions live; events from
plain sync code go to one shared background loop. The consumer steps each
handler coroutine inside itself (no task per event) and lingers across short
gaps, so a paced stream costs one consumer task, not one per token. When a
loop shuts down, what fits in the exit budget is delivered and the rest is
counted as dropped. On the token path: ``LoopLane.kick`` schedules the
consumer when the lane goes from idle to busy, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._compat import fork_safe, get_running_loop
from ._hooks import END_HOOKS, PAIRED_HOOKS, START_HOOKS
from ._isolation import first_step
from ._observe import Batch
from ._queue import CONSUMER_TASKS, LINGER_SECONDS, POLL_SECONDS, Barrier, Lane, LaneOwner

_now = time.monotonic
RUN_HOOKS = START_HOOKS | END_HOOKS | PAIRED_HOOKS  # hooks with run bookkeeping to do
COMMIT_EVERY = 256  # deliveries per committed batch on a loop lane
YIELD_EVERY = 512  # deliveries without a suspension after which the consumer yields


class LoopLane(Lane):
    """Drained by a task on one event loop (the emitter's, or the background one)."""

    def __init__(
        self, engine: LaneOwner, loop: asyncio.AbstractEventLoop, background: bool
    ) -> None:
        super().__init__(engine)
        self.loop = loop
        self.background = background
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def _may_block(self) -> bool:
        # Blocking the loop that must drain this lane could never make room.
        return get_running_loop() is not self.loop

    def kick(self) -> None:
        with self._lock:
            if self.scheduled:
                return
            self.scheduled = True
        loop = self.loop
        assert loop is not None
        try:
            if get_running_loop() is loop:
                loop.call_soon(self._start)
            else:
                loop.call_soon_threadsafe(self._start)
        except RuntimeError:  # the loop is closed: nothing will ever drain it
            self.scheduled = False
            self.discard_all("loop_closed")

    def _start(self) -> None:
        assert self.loop is not None
        # Held here: the loop keeps only a weak reference to its tasks.
        self._task = self.loop.create_task(self._consume())
        CONSUMER_TASKS.add(self._task)

    def _unschedule(self) -> bool:
        with self._lock:
            self.scheduled = False
            if self.queue:
                self.scheduled = True
                return False
            return True

    async def _consume(self) -> None:
        try:
            while True:
                await self._drain()
                # Stay a moment for the next event (a paced stream's next token), as
                # thread lanes do, so a stream costs one consumer task, not one per token.
                await self._linger()
                if not self.queue and self._unschedule():
                    return
        except asyncio.CancelledError:
            # The loop is shutting down (asyncio.run cancels leftover tasks and
            # then waits for them): deliver what fits in the exit budget.
            await self._salvage()
            raise

    async def _linger(self) -> None:
        quiet_since = _now()
        while not self.queue and _now() - quiet_since < LINGER_SECONDS:
            await asyncio.sleep(POLL_SECONDS)

    async def _drain(self) -> None:
        """Deliver what is queued; the common case (a hook that finishes in its first
        step, nothing for the breaker or the run bookkeeping to do) stays in this loop."""
        queue = self.queue
        engine = self.engine
        observer = engine.observer
        breaker = observer.breaker
        batch = self.batch
        durations, lags, hooks = batch.durations, batch.lags, batch.hooks
        calls: dict[str, Callable[..., Any]] = {}  # resolved once per drain
        plain: dict[str, bool] = {}  # hooks with no run bookkeeping (stops, paired runs)
        in_a_row = 0  # deliveries since this consumer last let the loop run
        self.note_depth()
        try:
            while True:
                try:
                    entry = queue.popleft()
                except IndexError:
                    return
                if self._space_waiters:
                    self._popped()
                if isinstance(entry, Barrier):
                    self.note_depth()
                    batch = observer.commit(batch, self)
                    durations, lags, hooks = batch.durations, batch.lags, batch.hooks
                    self.took_barrier(entry)
                    continue
                hook, args, kwargs, context, emitted_at, _ = entry
                is_plain = plain.get(hook)
                if is_plain is None:
                    is_plain = plain[hook] = hook not in RUN_HOOKS
                    calls[hook] = engine.async_call(hook)
                if is_plain and not breaker.consecutive and not engine.failing:
                    started = _now()
                    self.busy_since, self.inflight = started, hook
                    step = first_step(calls[hook], args, kwargs, context)
                    if step is None:
                        self.busy_since = self.inflight = None
                        durations.append(_now() - started)
                        lags.append(started - emitted_at)
                        hooks.append(hook)
                    else:
                        rest = engine.finish_async(self, entry, batch, step, started)
                        if rest is not None:
                            await rest
                            in_a_row = 0
                else:
                    rest = engine.deliver_now(self, entry, batch, calls)
                    if rest is not None:
                        await rest
                        in_a_row = 0
                if len(hooks) >= COMMIT_EVERY:
                    self.note_depth()
                    batch = observer.commit(batch, self)
                    durations, lags, hooks = batch.durations, batch.lags, batch.hooks
                    in_a_row += COMMIT_EVERY
                    if in_a_row >= YIELD_EVERY:
                        # Handlers that never suspend would otherwise hold this loop for
                        # a whole backlog: let the streams it serves move on meanwhile.
                        in_a_row = 0
                        await asyncio.sleep(0)
        finally:
            if batch is self.batch:  # else a reaping of this lane committed it already
                observer.commit(batch, self)

    async def _salvage(self) -> None:
        # An event whose delivery the shutdown cut off is counted dropped: delivering the
        # ones after it would leave a hole in the handler's sequence, so they go with it.
        budget = 0.0 if self.cut_off else self.engine.options.exit_timeout
        deadline = _now() + budget
        try:
            while self.queue and _now() < deadline:
                entry = self.queue.popleft()
                if isinstance(entry, Barrier):
                    self.took_barrier(entry)
                    continue
                batch = Batch()
                try:  # cut off by the deadline, deliver_async counts it as dropped
                    await asyncio.wait_for(
                        self.engine.deliver_async(self, entry, batch), max(deadline - _now(), 0.0)
                    )
                finally:
                    self.engine.observer.commit(batch)
        except (TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.discard_all("loop_closed")
            self.cut_off = False
            self.scheduled = False

    def reap_if_dead(self) -> None:
        """A closed loop will never drain this lane: count what is left as dropped."""
        loop = self.loop
        if loop is not None and loop.is_closed():
            # Deliveries its consumer finished but never committed are counted as done.
            self.engine.observer.commit(self.batch, self)
            if self.inflight is not None:  # its consumer task died with the loop
                self.engine.observer.dropped(self.inflight, reason="loop_closed")
                self.busy_since = self.inflight = None
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
