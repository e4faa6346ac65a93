"""Getting events from the token path to the handler without the token path waiting.

The emitter only appends a tuple to the handler's lane (a ``deque``, atomic
under the GIL) and bumps a counter. It wakes a thread only when the lane goes
from idle to busy; while a lane has traffic a worker keeps it "lingering" and
polls it every few milliseconds, so a CPU-bound stream pays no wake-up or GIL
hand-off per token.

* Sync handlers (and handlers mixing sync and async hooks) are drained by a
  small shared pool of worker threads, one lane at a time per worker, so each
  handler sees its events in order and one at a time, and a hung handler only
  ever holds its own worker.
* Handlers whose hooks are all ``async def`` are drained by a task on the
  event loop that emitted the event (where their sessions live), or on one
  shared background loop when the emitter had no loop.
* ``flush`` places a barrier at the tail of every lane and waits for them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import itertools
import os
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeAlias

from ._hooks import ERROR_HOOKS, HOOKS, is_async_callable
from ._isolation import (
    Contained,
    Resolver,
    StopStream,
    acall_hook,
    call_hook,
    contained,
    own_task_is_cancelling,
    passes_through_caller,
    unwrap,
)
from ._observe import PAIRED_HOOKS, Batch, Observer, count_value, register_depth_source
from ._options import Options
from ._stats import Stats, merge_stats

_get_running_loop = asyncio._get_running_loop
_copy_context = contextvars.copy_context
_now = time.monotonic

# (hook, args, kwargs, context, emitted_at, emitting loop)
Item: TypeAlias = tuple[
    str,
    tuple[Any, ...],
    dict[str, Any],
    contextvars.Context,
    float,
    "asyncio.AbstractEventLoop | None",
]

POLL_SECONDS = 0.002  # how often a busy lane is drained: the delivery latency bound
LINGER_SECONDS = 0.05  # quiet time after which a lane goes idle (next event wakes a worker)
BATCH = 512  # events one worker takes from one lane before giving others a turn
WATCHDOG_SECONDS = 0.25  # how often stuck deliveries are looked for
SPAWN_DELAY = 0.01  # a ready lane waiting this long with every worker busy gets a new worker
MAX_WORKERS = 64
WATCHDOG_OUTLIVES = 12  # the watchdog stays this many worker idle-exit times after them
IDLE_EXIT_ENV = "SAFECALLBACKS_WORKER_IDLE"
_MAX_STOP_MARKS = 1_000
_START_HOOKS = frozenset(hook for hook in HOOKS if hook.endswith("_start"))
_MAX_PARENTS = 10_000
PLAIN_RESULTS: set[type] = {type(None), bool, int, str}
"""Types a hook returned that are known not to be awaitable (checked once per type)."""
ROOT_END_HOOKS = frozenset(hook for hook in HOOKS if hook.endswith(("_end", "_error")))
"""Hooks that can end a root run: where ``settle`` waits for the backlog."""


class Unbound:
    """Stands in for a handler's engine until its first event: options and family to join.

    Put in place by hardened classes at construction and by copies (deep copies,
    unpickled handlers); the handler's first event makes the real engine.
    """

    __slots__ = ("options", "parent", "target")

    def __init__(self, options: Options, parent: Dispatcher | None = None) -> None:
        self.options = options
        self.parent = parent
        self.target: object = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unbound, (self.options, None))


class Barrier:
    """A marker placed at the tail of a lane; released once everything before it is done."""

    __slots__ = ("_callbacks", "_done", "_lock")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def release(self) -> None:
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(max(timeout, 0.0))

    def future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def notify() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(resolve)

        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(notify)
                return fut
        fut.set_result(None)
        return fut


class _Lane:
    """The bounded queue of one handler towards one consumer."""

    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, core: Dispatcher) -> None:
        self.core = core
        self.queue: deque[Item | Barrier] = deque()
        self.max_queue = core.options.max_queue
        self.emitted = core.observer.emitted
        self.scheduled = False
        self.high_water = 0
        self.busy_since: float | None = None
        self.inflight: str | None = None
        self.stuck_reported = False
        self.ready_at = 0.0
        self.batch = Batch()  # results not yet committed to the observer
        self._space = threading.Condition(threading.Lock())
        self._space_waiters = 0
        # Flush barriers never take an event's place: they are counted apart.
        self._barriers_in = itertools.count()
        self._barriers_out = itertools.count()

    # --- emitting side ---------------------------------------------------

    def put(self, item: Item) -> None:
        queue = self.queue
        if len(queue) >= self.max_queue and not self._make_room(item):
            return
        queue.append(item)
        if not self.scheduled:
            self.kick()

    def overflow(self, item: Item) -> None:
        """The slow half of ``put``, for recorders that found the queue full."""
        if self._make_room(item):
            self.queue.append(item)
            if not self.scheduled:
                self.kick()

    def put_barrier(self, barrier: Barrier) -> None:
        next(self._barriers_in)
        self.queue.append(barrier)
        if not self.scheduled:
            self.kick()

    def took_barrier(self, barrier: Barrier) -> None:
        """A barrier left the queue (everything before it is settled): release it."""
        next(self._barriers_out)
        barrier.release()

    def events_queued(self) -> int:
        """Events waiting, not counting flush barriers (exact, unlike ``len(queue)``)."""
        barriers = count_value(self._barriers_in) - count_value(self._barriers_out)
        return max(len(self.queue) - barriers, 0)

    def kick(self) -> None:
        raise NotImplementedError

    def _make_room(self, item: Item) -> bool:
        """Apply ``on_full``; False when ``item`` itself was dropped."""
        core = self.core
        self.note_depth()
        policy = core.options.on_full
        limit = core.options.max_queue
        if self.events_queued() < limit:
            return True  # only flush barriers made it look full
        if policy == "drop_oldest":
            # Barriers met on the way go back to the front: they still wait for the event
            # in delivery, and dropping events before them only settles those sooner.
            kept: list[Barrier] = []
            while self.events_queued() + len(kept) >= limit:  # kept: out of the queue
                try:
                    oldest = self.queue.popleft()
                except IndexError:
                    break
                if oldest.__class__ is Barrier:
                    kept.append(oldest)
                else:
                    self._discard(oldest, "queue_full")
            self.queue.extendleft(reversed(kept))
            return True
        if policy == "block" and self._may_block() and self._wait_for_space():
            return True
        core.observer.dropped(item[0], reason="queue_full")
        return False

    def _may_block(self) -> bool:
        return True

    def _wait_for_space(self) -> bool:
        limit = self.core.options.max_queue
        with self._space:
            self._space_waiters += 1
            try:
                return self._space.wait_for(
                    lambda: len(self.queue) < limit, self.core.options.block_timeout
                )
            finally:
                self._space_waiters -= 1

    def _discard(self, entry: Item | Barrier, reason: str) -> None:
        if isinstance(entry, Barrier):
            self.took_barrier(entry)  # everything ahead of it is gone too
        else:
            self.core.observer.dropped(entry[0], reason=reason)

    def _popped(self) -> None:
        if self._space_waiters:
            with self._space:
                self._space.notify_all()

    # --- both sides -------------------------------------------------------

    def discard_all(self, reason: str) -> None:
        """Count every queued event as dropped (closing, a dead loop, exit)."""
        dropped: Counter[str] = Counter()
        while True:
            try:
                entry = self.queue.popleft()
            except IndexError:
                break
            if isinstance(entry, Barrier):
                self.took_barrier(entry)
            else:
                dropped[entry[0]] += 1
        for hook, count in dropped.items():
            self.core.observer.dropped(hook, count, reason=reason)

    def queued_by_hook(self) -> Counter[str]:
        while True:
            try:
                entries = list(self.queue)
                break
            except RuntimeError:  # mutated while copying; try again
                continue
        found = Counter(e[0] for e in entries if not isinstance(e, Barrier))
        if self.inflight is not None:
            found[self.inflight] += 1
        return found

    def depth(self) -> int:
        """Events waiting, roughly: a flush marker at the tail is not counted."""
        queue = self.queue
        try:
            return len(queue) - (queue[-1].__class__ is Barrier)
        except IndexError:
            return 0

    def note_depth(self) -> None:
        self.high_water = max(self.high_water, self.depth())

    def reap_if_dead(self) -> None:
        """Account for events nobody will deliver any more (only loop lanes can lose theirs)."""

    def stuck(self, now: float) -> bool:
        since = self.busy_since
        return since is not None and now - since > self.core.options.timeout


class _ThreadLane(_Lane):
    """Drained by the shared worker pool."""

    def kick(self) -> None:
        pool().kick(self)

    def drain(self, budget: int) -> None:
        """Deliver up to ``budget`` events; the loop is kept lean on purpose (it is per event)."""
        queue = self.queue
        self.note_depth()
        core = self.core
        observer = core.observer
        breaker = observer.breaker
        batch = self.batch
        durations, lags, hooks, counts = batch.durations, batch.lags, batch.hooks, batch.counts
        calls: dict[str, Callable[..., Any]] = {}
        started = _now()
        try:
            for _ in range(budget):
                try:
                    entry = queue.popleft()
                except IndexError:
                    return
                if self._space_waiters:
                    self._popped()
                if entry.__class__ is Barrier:
                    batch = observer.commit(batch, self)  # exact counts once a flush returns
                    durations, lags, hooks, counts = (
                        batch.durations,
                        batch.lags,
                        batch.hooks,
                        batch.counts,
                    )
                    self.took_barrier(entry)
                    started = _now()
                    continue
                hook, args, kwargs, context, emitted_at, loop = entry  # type: ignore[misc]
                run_id = kwargs.get("run_id")
                if hook in _START_HOOKS:
                    core.remember_parent(run_id, kwargs)
                if breaker.state != "closed" and not observer.admit(hook, run_id):
                    continue
                call = calls.get(hook)
                if call is None:
                    call = calls[hook] = core.sync_call(hook)
                self.busy_since, self.inflight = started, hook
                kind: str | None = None
                try:
                    result = context.run(call, *args, **kwargs)
                    if result is not None and isinstance(result, Awaitable):
                        context.run(core.await_elsewhere, result, loop)
                except StopStream as stop:
                    core.mark_stop(hook, run_id, stop)
                except BaseException as exc:  # a worker must survive whatever a handler does
                    kind = observer.failure(hook, exc, run_id, args, kwargs)
                self.busy_since = self.inflight = None  # settled: no longer pending
                if hook in ROOT_END_HOOKS:
                    core.run_ended(run_id)
                ended = _now()
                if kind is None and breaker.consecutive:
                    observer.outcome(True)
                durations.append(ended - started)
                lags.append(started - emitted_at)
                hooks.append(hook)
                key = (hook, kind)
                counts[key] = counts.get(key, 0) + 1
                if kind is None and hook in PAIRED_HOOKS:
                    observer.track_run(hook, run_id)
                started = ended
        finally:
            self.busy_since, self.inflight = None, None
            self.stuck_reported = False
            observer.commit(batch, self)


class _LoopLane(_Lane):
    """Drained by a task on one event loop (the emitter's, or the background one)."""

    def __init__(self, core: Dispatcher, loop: asyncio.AbstractEventLoop, background: bool) -> None:
        super().__init__(core)
        self.loop = loop
        self.background = background
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def _may_block(self) -> bool:
        # Blocking the loop that must drain this lane could never make room.
        return _get_running_loop() is not self.loop

    def kick(self) -> None:
        with self._lock:
            if self.scheduled:
                return
            self.scheduled = True
        loop = self.loop
        assert loop is not None
        try:
            if _get_running_loop() is loop:
                loop.call_soon(self._start)
            else:
                loop.call_soon_threadsafe(self._start)
        except RuntimeError:  # the loop is closed: nothing will ever drain it
            self.scheduled = False
            self.discard_all("loop_closed")

    def _start(self) -> None:
        assert self.loop is not None
        self._task = self.loop.create_task(self._consume())

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
        queue = self.queue
        observer = self.core.observer
        batch = self.batch
        try:
            while True:
                self.note_depth()
                try:
                    entry = queue.popleft()
                except IndexError:
                    return
                self._popped()
                if isinstance(entry, Barrier):
                    batch = observer.commit(batch, self)
                    self.took_barrier(entry)
                    continue
                await self.core.deliver_async(self, entry, batch)
                if len(batch) >= 64:
                    batch = observer.commit(batch, self)
        finally:
            observer.commit(batch, self)

    async def _salvage(self) -> None:
        deadline = _now() + self.core.options.exit_timeout
        try:
            while self.queue and _now() < deadline:
                entry = self.queue.popleft()
                if isinstance(entry, Barrier):
                    self.took_barrier(entry)
                    continue
                batch = Batch()
                try:  # cut off by the deadline, deliver_async counts it as dropped
                    await asyncio.wait_for(
                        self.core.deliver_async(self, entry, batch), max(deadline - _now(), 0.0)
                    )
                finally:
                    self.core.observer.commit(batch)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass
        finally:
            self.discard_all("loop_closed")
            self.scheduled = False

    def reap_if_dead(self) -> None:
        """A closed loop will never drain this lane: count what is left as dropped."""
        loop = self.loop
        if loop is not None and loop.is_closed():
            if self.inflight is not None:  # its consumer task died with the loop
                self.core.observer.dropped(self.inflight, reason="loop_closed")
                self.busy_since = self.inflight = None
            self.discard_all("loop_closed")


class Dispatcher:
    """The engine behind one hardened handler: lanes, inline calls, flush, close, stats.

    A handler LangChain copies (``copy_with_metadata_defaults``, ``copy.copy``)
    gets an engine of its own that joins the original's *family*: flushing,
    closing or reading the stats of the original covers its copies.
    """

    def __init__(
        self,
        target: object,
        resolve: Resolver,
        name: str,
        options: Options,
        async_only: bool,
        has_async: bool,
        hooks: Iterable[str] = (),
        async_hooks: Iterable[str] = (),
        requested: Options | None = None,
        parent: Dispatcher | None = None,
    ) -> None:
        self.target = target
        self.resolve = resolve
        self.name = name
        self.options = options
        self.requested = requested if requested is not None else options
        self.async_only = async_only
        self.has_async = has_async
        self.observer = Observer(name, options)
        self.observer.on_breaker_change = self._refresh_fast_lane
        self.observer.on_success = self._succeeded
        self.emitted = self.observer.emitted
        self.breaker = self.observer.breaker
        self.closed = False
        self.stop_marks: dict[object, StopStream] = {}
        self._parents: dict[object, object] = {}
        self._ended_runs: dict[object, None] = {}  # runs whose end had no hook to deliver
        self._thread_lane = _ThreadLane(self)
        self._loop_lanes: dict[asyncio.AbstractEventLoop | None, _LoopLane] = {}
        self._loop_lanes_lock = threading.Lock()
        self._pruned_high_water = 0
        self._high_water = 0  # never falls, whatever lanes come and go
        self.inline_counts: dict[str, itertools.count[int]] = {
            hook: itertools.count() for hook in hooks
        }
        self.awaited_hooks = self._awaited_hooks(frozenset(async_hooks), frozenset(hooks))
        self.root: Dispatcher = parent.root if parent is not None else self
        self.members: weakref.WeakSet[Dispatcher] = weakref.WeakSet()
        if parent is not None:
            self.root.members.add(self)
        self.fast_lane: _Lane | None = None
        self.inline_ready = False
        self.bare_run_inline = False  # set by the hardened surface from the handler's class
        self.failing = False  # some failure since the last success: a success resets the breaker
        self._refresh_fast_lane()
        _registry.add(self)

    def _succeeded(self) -> None:
        self.failing = False

    def _awaited_hooks(self, async_hooks: frozenset[str], hooks: frozenset[str]) -> frozenset[str]:
        """Hooks LangChain's async manager must await rather than call."""
        if self.options.mode == "inline":
            return async_hooks  # awaited as LangChain would await the bare handler
        if self.options.settle > 0:
            return frozenset(h for h in hooks if h in ROOT_END_HOOKS)  # to settle the backlog
        return frozenset()

    def _refresh_fast_lane(self) -> None:
        """Which fast path recorders may take: the lane to append to, or calling inline."""
        open_ = not self.closed and self.breaker.state == "closed"
        offload = self.options.mode == "offload"
        fast = offload and not self.has_async and not self.closed and not self.stop_marks
        self.fast_lane = self._thread_lane if fast else None
        self.inline_ready = self.options.mode == "inline" and open_

    # --- copies --------------------------------------------------------------

    def __copy__(self) -> Dispatcher:
        return self  # a shallow copy of a handler shares it until its first event rebinds

    def __deepcopy__(self, memo: dict[int, Any]) -> Unbound:
        return Unbound(self.requested, self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unbound, (self.requested, None))

    def family(self) -> list[Dispatcher]:
        """This engine and, for an original handler, the engines of its copies."""
        if self.root is not self:
            return [self]
        return [self, *list(self.members)]

    # --- the token path ---------------------------------------------------

    def _accept(self, hook: str, kwargs: Mapping[str, Any]) -> bool:
        """Count the event as emitted; False once closed (then it is counted dropped).

        Raises a pending ``StopStream`` for this event's run first.
        """
        if self.stop_marks:
            self.check_stop(hook, kwargs)
        next(self.observer.emitted)
        if self.closed:
            self.observer.dropped(hook, reason="closed")
            return False
        return True

    def record(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Take one event on the emitter's side (recorders inline the common case)."""
        if not self._accept(hook, kwargs):
            return
        loop = _get_running_loop()
        if self.options.mode == "inline":
            if loop is not None and self.has_async and self._is_async(hook):
                # Awaiting here would block the emitting loop: run it as an ordered task on it.
                self._loop_lane(loop).put((hook, args, kwargs, _copy_context(), _now(), loop))
            else:
                self._call_inline(hook, args, kwargs)
            return
        lane: _Lane = self._loop_lane(loop) if self.async_only else self._thread_lane
        lane.put((hook, args, kwargs, _copy_context(), _now(), loop))

    async def arecord_inline(
        self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Inline mode on the async path: LangChain awaits this, so the handler is awaited here.

        Exactly as LangChain would run the bare handler: a ``run_inline`` handler
        in the caller's own task and context (context it sets is seen by later
        hooks), any other in a task of its own with a copy of the context (which
        also lets the loop run other tasks between events, as consumers of
        ``AsyncIteratorCallbackHandler`` rely on). ``timeout`` bounds it.
        """
        if not self._accept(hook, kwargs):
            return
        run_id = kwargs.get("run_id")
        if not self.observer.admit(hook, run_id):
            return
        started = _now()
        coro = acall_hook(self.resolve, self.target, hook, args, kwargs)
        if self.bare_run_inline:  # LangChain would await it in the caller's task
            error = await run_here(coro, self.options.timeout)
        else:  # LangChain would gather it: a task of its own, in a copy of the context
            error = await run_bounded(coro, contextvars.copy_context(), self.options.timeout)
        if error is not None and passes_through_caller(error):
            self._commit_one(hook, run_id, None, started, started, args, kwargs)
            raise error
        self._commit_one(hook, run_id, error, started, started, args, kwargs)

    async def adeliver(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """What LangChain's async manager awaits for a hook in ``awaited_hooks``."""
        if self.options.mode == "inline":
            await self.arecord_inline(hook, args, kwargs)
            return
        self.record(hook, args, kwargs)
        if kwargs.get("parent_run_id") is None:
            await self.asettle()

    async def asettle_after(self, hook: str, kwargs: Mapping[str, Any]) -> None:
        """An end hook the handler lacks, on the async path: settle after a root run."""
        self.end_emitted(hook, kwargs)
        if kwargs.get("parent_run_id") is None:
            await self.asettle()

    def _is_async(self, hook: str) -> bool:
        try:
            return is_async_callable(self.resolve(hook))
        except Exception:
            return False

    def _call_inline(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        run_id = kwargs.get("run_id")
        if not self.observer.admit(hook, run_id):
            return
        started = _now()
        error: BaseException | None = None
        try:
            result = call_hook(self.resolve, self.target, hook, args, kwargs)
            if result is not None and isinstance(result, Awaitable):
                self.await_elsewhere(result, None)
        except BaseException as exc:
            if passes_through_caller(exc):
                self._commit_one(hook, run_id, None, started, started, args, kwargs)
                raise
            error = exc
        self._commit_one(hook, run_id, error, started, started, args, kwargs)

    def inline_result(
        self, hook: str, result: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The inline fast path's hook returned something: an awaitable is run to its end."""
        if not isinstance(result, Awaitable):
            if len(PLAIN_RESULTS) < 256:
                PLAIN_RESULTS.add(type(result))  # e.g. a tracer's Run: never check it again
            next(self.inline_counts[hook])
            return
        try:
            self.await_elsewhere(result, None)
        except BaseException as exc:
            self.inline_failed(hook, exc, args, kwargs)
            return
        next(self.inline_counts[hook])

    def inline_failed(
        self, hook: str, exc: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The inline fast path's handler raised ``exc``: account, fall back, or pass it on."""
        next(self.emitted)
        self.failing = True
        run_id = kwargs.get("run_id")
        at = _now()
        if hook == "on_chat_model_start" and isinstance(exc, NotImplementedError):
            # LangChain's own fallback: the handler gets on_llm_start instead.
            error: BaseException | None = None
            try:
                call_hook(self.resolve, self.target, hook, args, kwargs)
            except BaseException as again:
                if passes_through_caller(again):
                    self._commit_one(hook, run_id, None, at, at, args, kwargs)
                    raise
                error = again
            self._commit_one(hook, run_id, error, at, at, args, kwargs)
            return
        if passes_through_caller(exc):
            self._commit_one(hook, run_id, None, at, at, args, kwargs)
            raise exc
        self._commit_one(hook, run_id, exc, at, at, args, kwargs)

    def settle_now(self) -> None:
        """A root run ended on a sync emitter: wait up to ``settle`` for this backlog."""
        if self._is_stuck():
            return
        deadline = _now() + self.options.settle
        here = _get_running_loop()
        for lane, barrier in self.place_barriers():
            if here is not None and lane.loop is here:
                continue  # that loop can only drain once this caller returns
            _wait_settled(lane, barrier, deadline)

    async def asettle(self) -> None:
        """``settle_now`` for async emitters: waits without blocking the loop."""
        if self.options.settle <= 0 or self._is_stuck():
            return
        await self._await_barriers(self.place_barriers(), self.options.settle)

    def _is_stuck(self) -> bool:
        now = _now()
        threshold = self.options.stall_threshold
        for lane in self.lanes():
            since = lane.busy_since
            if since is not None and now - since > threshold:
                return True
        return False

    def _commit_one(
        self,
        hook: str,
        run_id: object,
        error: BaseException | None,
        started: float,
        at: float,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> None:
        batch = Batch()
        self._add_result(batch, hook, run_id, error, started, at, args, kwargs)
        self.observer.commit(batch)

    def check_stop(self, hook: str, kwargs: Mapping[str, Any]) -> None:
        """Raise a pending ``StopStream`` into the run it was raised for (emitter side)."""
        if hook in ERROR_HOOKS:
            return
        marks = self.stop_marks
        found = marks.get(kwargs.get("run_id")) or marks.get(kwargs.get("parent_run_id"))
        if found is None:
            return
        for run_id in [r for r, exc in list(marks.items()) if exc is found]:
            marks.pop(run_id, None)
        self._refresh_fast_lane()
        raise StopStream(found.reason) from found

    # --- lanes -------------------------------------------------------------

    def _loop_lane(self, loop: asyncio.AbstractEventLoop | None) -> _LoopLane:
        lane = self._loop_lanes.get(loop)
        if lane is not None:
            return lane
        target = background_loop() if loop is None else loop
        with self._loop_lanes_lock:
            lane = self._loop_lanes.get(target)
            if lane is None:
                # A new loop (one asyncio.run() per request is common): the lanes of
                # loops that closed since are accounted for and let go, so closed loops
                # are never kept alive by a shared handler.
                self._forget_closed_loops()
                lane = _LoopLane(self, target, background=loop is None)
                self._loop_lanes[target] = lane
            # Sync emitters look the background lane up under None.
            self._loop_lanes[loop] = lane
            return lane

    def lanes(self) -> list[_Lane]:
        """Every lane, after accounting for and forgetting those of closed loops."""
        with self._loop_lanes_lock:
            self._forget_closed_loops()
            unique = {id(lane): lane for lane in self._loop_lanes.values()}
        return [self._thread_lane, *unique.values()]

    def _forget_closed_loops(self) -> None:
        """Account for the lanes of closed loops and drop them (``_loop_lanes_lock`` held)."""
        for loop, lane in list(self._loop_lanes.items()):
            if lane.loop is not None and lane.loop.is_closed():
                lane.reap_if_dead()
                del self._loop_lanes[loop]  # so closed loops are not kept alive
                self._pruned_high_water = max(self._pruned_high_water, lane.high_water)

    # --- delivery ---------------------------------------------------------

    def sync_call(self, hook: str) -> Callable[..., Any]:
        """The callable a worker runs for ``hook`` (resolved once per batch)."""
        if hook == "on_chat_model_start":
            # Goes through call_hook for LangChain's on_llm_start fallback.
            resolve, target = self.resolve, self.target

            def chat_model_start(*args: Any, **kwargs: Any) -> Any:
                return call_hook(resolve, target, hook, args, kwargs)

            return chat_model_start
        return self.resolve(hook)

    def await_elsewhere(self, awaitable: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run an async hook from a thread: the emitting loop if alive, else the background one."""
        if loop is None or loop.is_closed() or not loop.is_running():
            loop = background_loop()
        future: Future[Any] = asyncio.run_coroutine_threadsafe(contained(awaitable), loop)
        try:
            future.result(self.options.timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"async hook exceeded timeout={self.options.timeout}s") from None
        except Contained as carrier:
            raise carrier.original from None

    async def deliver_async(self, lane: _Lane, item: Item, batch: Batch) -> None:
        """Deliver one event to an async handler on this loop, as a task in its context."""
        hook, args, kwargs, context, emitted_at, _ = item
        run_id = kwargs.get("run_id")
        if hook in _START_HOOKS:
            self.remember_parent(run_id, kwargs)
        if not self.observer.admit(hook, run_id):
            return
        started = _now()
        lane.busy_since, lane.inflight = started, hook
        try:
            error = await drive_bounded(
                acall_hook(self.resolve, self.target, hook, args, kwargs),
                context,
                self.options.timeout,
            )
        except asyncio.CancelledError:
            # The consumer itself is being cancelled (its loop is shutting down, or the
            # exit budget ran out): the handler did not fail, the event was cut off.
            lane.busy_since, lane.inflight = None, None
            self.observer.dropped(hook, reason="shutdown")
            raise
        # GeneratorExit here is never the handler's: the loop was closed with this
        # consumer pending and it is being thrown away; reap_if_dead() accounts for it.
        lane.busy_since, lane.inflight = None, None
        if isinstance(error, StopStream):
            self.mark_stop(hook, run_id, error)
            error = None
        if hook in ROOT_END_HOOKS:
            self.run_ended(run_id)
        self._add_result(batch, hook, run_id, error, started, emitted_at, args, kwargs)

    def _add_result(
        self,
        batch: Batch,
        hook: str,
        run_id: object,
        error: BaseException | None,
        started: float,
        emitted_at: float,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if error is None:
            self.observer.outcome(True)
            kind = None
            if hook in PAIRED_HOOKS:
                self.observer.track_run(hook, run_id)
        else:
            kind = self.observer.failure(hook, error, run_id, args, kwargs)
        batch.add(hook, kind, _now() - started, started - emitted_at)

    def remember_parent(self, run_id: object, kwargs: Mapping[str, Any]) -> None:
        parent = kwargs.get("parent_run_id")
        if parent is not None:
            self._parents[run_id] = parent
            if len(self._parents) > _MAX_PARENTS:
                self._parents.pop(next(iter(self._parents)))

    def mark_stop(self, hook: str, run_id: object, exc: StopStream) -> None:
        """Have ``exc`` raised into ``run_id`` and its ancestors at their next event.

        A run whose end is being delivered has no next event: its ancestors are
        marked; with none left the stop came too late, and is counted and logged.
        """
        current: object = self._parents.get(run_id) if hook in ROOT_END_HOOKS else run_id
        marked = False
        for _ in range(64):
            if current is None:
                break
            if current not in self._ended_runs:
                self.stop_marks[current] = exc
                marked = True
            current = self._parents.get(current)
        while len(self.stop_marks) > _MAX_STOP_MARKS:
            self.stop_marks.pop(next(iter(self.stop_marks)))
        if marked:
            self.fast_lane = None
        else:
            self.observer.stop_too_late(exc.reason)

    def end_emitted(self, hook: str, kwargs: Mapping[str, Any]) -> None:
        """Emitter side: a run ended that this handler has no end hook for.

        A pending stop for it is raised now (its last chance); otherwise the run is
        remembered as over, so a stop delivered later is known to come too late.
        """
        if self.stop_marks:
            self.check_stop(hook, kwargs)
        run_id = kwargs.get("run_id")
        ended = self._ended_runs
        ended[run_id] = None
        if len(ended) > _MAX_PARENTS:
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                ended.pop(next(iter(ended)))
        if self.stop_marks:
            self.run_ended(run_id)

    def run_ended(self, run_id: object) -> None:
        """A run's end was delivered: its parent link and any unused stop mark go with it."""
        self._parents.pop(run_id, None)
        marks = self.stop_marks
        if not marks:
            return
        exc = marks.pop(run_id, None)
        if exc is None:
            return
        if not any(other is exc for other in list(marks.values())):
            self.observer.stop_too_late(exc.reason)  # every run it was meant for is over
        if not marks:
            self._refresh_fast_lane()

    # --- flush, close, stats ------------------------------------------------

    def place_barriers(self) -> list[tuple[_Lane, Barrier]]:
        placed = []
        for lane in self.lanes():
            barrier = Barrier()
            lane.put_barrier(barrier)
            placed.append((lane, barrier))
        return placed

    def _family_barriers(self) -> list[tuple[_Lane, Barrier]]:
        return [placed for core in self.family() for placed in core.place_barriers()]

    def flush(self, timeout: float, what: str = "flush") -> bool:
        _refuse_in_a_loop(what)
        deadline = _now() + timeout
        ok = True
        for lane, barrier in self._family_barriers():
            ok = _wait_settled(lane, barrier, deadline) and ok
        self._after_flush(ok, timeout)
        return ok

    async def aflush(self, timeout: float) -> bool:
        ok = await self._await_barriers(self._family_barriers(), timeout)
        self._after_flush(ok, timeout)
        return ok

    def _after_flush(self, ok: bool, timeout: float) -> None:
        for core in self.family():
            core.observer.summarise()
        if not ok:  # the caller learns it from the result; the log says what is left
            self.observer.flush_timed_out(self.stats().pending, timeout)

    async def _await_barriers(self, placed: list[tuple[_Lane, Barrier]], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = _now() + timeout
        futures = {barrier.future(loop): lane for lane, barrier in placed}
        pending = set(futures)
        while pending and _now() < deadline:
            _, pending = await asyncio.wait(
                pending, timeout=min(_SETTLE_SLICE, max(deadline - _now(), 0.0))
            )
            for fut in pending:
                futures[fut].reap_if_dead()  # releases the barrier if its loop is gone
        for fut in pending:
            fut.cancel()
        return not pending

    def close(self, timeout: float, what: str = "close") -> bool:
        ok = self.flush(timeout, what) if not self.closed else True
        for core in self.family():
            core.shut(reason="closed")
        return ok

    async def aclose(self, timeout: float) -> bool:
        ok = await self.aflush(timeout) if not self.closed else True
        for core in self.family():
            core.shut(reason="closed")
        return ok

    def shut(self, reason: str) -> None:
        """Stop taking events; count whatever is still queued as dropped."""
        self.closed = True
        self._refresh_fast_lane()
        for lane in self.lanes():
            lane.discard_all(reason)  # a delivery in flight still finishes and is counted
        if _POOL is not None:
            _POOL.forget(self._thread_lane)
        _registry.discard(self)

    def stats(self) -> Stats:
        """This engine's snapshot, with its copies' counts added for an original handler."""
        own = self._own_stats()
        members = self.family()[1:]
        if not members:
            return own
        others = [core._own_stats() for core in members]
        durations = [core.observer.estimators() for core in self.family()]
        return merge_stats(own, others, durations)

    def _own_stats(self) -> Stats:
        now = _now()
        queued: Counter[str] = Counter()
        depth = 0
        stuck = False
        lanes = self.lanes()
        high = self._pruned_high_water
        for lane in lanes:
            waiting = lane.queued_by_hook()
            queued.update(waiting)
            depth += sum(waiting.values()) - (lane.inflight is not None)
            high = max(high, lane.high_water)
            stuck = stuck or lane.stuck(now)
        high = self._high_water = max(self._high_water, high, depth)
        self.observer.emit_pending()  # the caller's thread, never the token path
        inline = Batch()
        for hook, counter in self.inline_counts.items():
            count = count_value(counter)
            if count:
                inline.counts[(hook, None)] = count
        return self.observer.snapshot(
            sum(inline.counts.values()),
            self.options.mode,
            queued,
            depth,
            max(high, depth),
            stuck,
            self.closed,
            live=lambda: [inline, *(lane.batch for lane in lanes)],
        )

    def queue_depth(self) -> int:
        return sum(lane.depth() for lane in self.lanes())

    def reset_after_fork(self) -> None:
        self.observer.reset_after_fork()
        self.emitted = self.observer.emitted
        self.breaker = self.observer.breaker
        self.inline_counts = {hook: itertools.count() for hook in self.inline_counts}
        self.stop_marks.clear()
        self._parents.clear()
        self._ended_runs.clear()
        self._thread_lane = _ThreadLane(self)
        self._loop_lanes = {}
        self._loop_lanes_lock = threading.Lock()
        self._refresh_fast_lane()


_ASYNC_ALTERNATIVE = {
    "flush": "await safecallbacks.aflush(handler)",
    "close": "await safecallbacks.aclose(handler)",
    "__exit__": "async with handler: ...",
}


def _refuse_in_a_loop(what: str) -> None:
    """Blocking waits cannot work inside a running event loop: say so, name the way out.

    The loop they would block may be the one that must deliver (async handlers), and
    for other handlers it would freeze every task on it for up to ``timeout``.
    """
    if _get_running_loop() is not None:
        raise RuntimeError(
            f"safecallbacks: a blocking {what}() was called inside a running event loop, "
            f"where it would block the loop it waits for; use "
            f"`{_ASYNC_ALTERNATIVE.get(what, 'the async variant')}` instead"
        )


async def run_here(coro: Any, timeout: float) -> BaseException | None:
    """Await a handler coroutine in the caller's own task; return what it raised, if anything.

    Used for inline async hooks, so context the hook sets stays visible to the
    caller's later hooks, as it would bare. Past ``timeout`` it is cancelled and
    reported as a ``TimeoutError``. A real cancellation of the caller's task
    passes through.
    """
    timeout_cm = getattr(asyncio, "timeout", None)
    if timeout_cm is None:  # pragma: no cover - Python 3.10: a task in a copied context
        return await run_bounded(coro, contextvars.copy_context(), timeout)
    limit = timeout_cm(timeout)
    try:
        async with limit:
            await coro
    except TimeoutError as exc:
        if not limit.expired():
            return exc  # the handler's own TimeoutError
        if own_task_is_cancelling():
            raise
        return TimeoutError(f"async hook exceeded timeout={timeout}s")
    except asyncio.CancelledError as exc:
        if own_task_is_cancelling():
            raise
        return exc
    except BaseException as exc:
        return unwrap(exc)
    return None


async def run_bounded(
    coro: Any, context: contextvars.Context, timeout: float
) -> BaseException | None:
    """Run a handler coroutine as a task in ``context``; return what it raised, if anything.

    The task is never awaited directly: a task that ends with ``GeneratorExit``
    is thrown into its awaiter with *close* semantics, which would silently
    close our own coroutines. Past ``timeout`` it is cancelled and reported as
    a ``TimeoutError``; if the handler ignores the cancellation we still move on.
    """
    loop = asyncio.get_running_loop()
    task = _task_in_context(loop, contained(coro), context)
    finished: asyncio.Future[None] = loop.create_future()
    timed_out = False

    def wake(_: object) -> None:
        if not finished.done():
            finished.set_result(None)

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        task.cancel()
        wake(None)

    task.add_done_callback(wake)
    timer = loop.call_later(timeout, expire)
    try:
        await finished
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        timer.cancel()
    if timed_out:
        return TimeoutError(f"async hook exceeded timeout={timeout}s")
    if task.cancelled():
        return asyncio.CancelledError()
    error = task.exception()
    return None if error is None else unwrap(error)


class _Timeout(Exception):
    """Raised by ``_Drive`` once the handler's time is up and it has been closed."""


class _Drive:
    """Runs the rest of a handler coroutine inside the awaiting task, each step in its context.

    A task per event costs more than most async handlers do; stepping the
    coroutine here needs no task, no future and no extra loop iteration. The
    awaiting consumer task passes on whatever the handler waits for, exactly
    as it would for its own awaits.
    """

    __slots__ = ("context", "coro", "first", "timed_out")

    def __init__(self, coro: Any, first: Any, context: contextvars.Context) -> None:
        self.coro, self.first, self.context = coro, first, context
        self.timed_out = False

    def __await__(self) -> Any:
        coro, run = self.coro, self.context.run
        value = self.first
        while True:
            try:
                sent = yield value
            except BaseException as thrown:
                if self.timed_out:
                    self._cancel_for_timeout(thrown)
                try:
                    value = run(coro.throw, thrown)
                except StopIteration:
                    return
                continue
            try:
                value = run(coro.send, sent)
            except StopIteration:
                return

    def _cancel_for_timeout(self, cancellation: BaseException) -> None:
        """Cancel the handler as asyncio would; if it carries on regardless, close it."""
        try:
            self.context.run(self.coro.throw, cancellation)
        except BaseException:  # finished, cancelled or failed: either way it is over
            raise _Timeout from None
        with contextlib.suppress(RuntimeError):  # it ignored GeneratorExit too: move on
            self.coro.close()
        raise _Timeout


async def drive_bounded(
    coro: Any, context: contextvars.Context, timeout: float
) -> BaseException | None:
    """Run a handler coroutine within the current task; return what it raised, if anything.

    Its first step runs at once (most handlers finish without suspending);
    the rest is stepped by ``_Drive``. Past ``timeout`` the handler is closed
    and a ``TimeoutError`` returned. Cancelling the current task still
    cancels it: that cancellation is passed into the handler, then re-raised.
    """
    try:
        first = context.run(coro.send, None)
    except StopIteration:
        return None
    except BaseException as exc:
        return exc
    drive = _Drive(coro, first, context)
    task = asyncio.current_task()
    assert task is not None

    def expire() -> None:
        drive.timed_out = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        await drive
    except _Timeout:
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None:
            uncancel()
        return TimeoutError(f"async hook exceeded timeout={timeout}s")
    except asyncio.CancelledError as exc:
        if own_task_is_cancelling():
            raise  # the consumer itself is being cancelled: pass it on
        return exc  # the handler cancelled itself
    except BaseException as exc:
        return exc
    finally:
        timer.cancel()
    return None


_SETTLE_SLICE = 0.05  # how often a waiting flush checks whether a lane's loop has closed


def _wait_settled(lane: _Lane, barrier: Barrier, deadline: float) -> bool:
    """Wait for ``barrier``; a lane whose loop closes meanwhile is settled by reaping it."""
    while not barrier.wait(min(_SETTLE_SLICE, deadline - _now())):
        lane.reap_if_dead()
        if barrier.done():
            return True
        if _now() >= deadline:
            return False
    return True


def _task_in_context(
    loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context
) -> asyncio.Task[Any]:
    if sys.version_info >= (3, 11):
        return loop.create_task(coro, context=context)
    return context.run(loop.create_task, coro)  # pragma: no cover - Python 3.10


# --- the shared worker pool ---------------------------------------------------


def _idle_exit_seconds() -> float:
    try:
        return max(float(os.environ.get(IDLE_EXIT_ENV, "5")), 0.01)
    except ValueError:
        return 5.0


class _Pool:
    """Worker threads shared by every hardened sync handler in the process, and one watchdog.

    Workers only drain lanes. The watchdog polls lanes that are between
    batches ("lingering"), reports stuck deliveries, and starts another worker
    only when a ready lane has waited ``SPAWN_DELAY`` with no worker free: so
    microsecond handlers share a couple of threads however many handlers there
    are, while a hung handler costs one thread and delays the others by at
    most that delay. Idle workers, and the watchdog when nothing is left to
    watch, exit after ``idle_exit`` seconds.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # idle workers wait here
        self.watch = threading.Condition(self.lock)  # the watchdog waits here
        self.ready: deque[_ThreadLane] = deque()
        self.lingering: dict[_ThreadLane, float] = {}
        self.busy: set[_ThreadLane] = set()
        self.threads: set[threading.Thread] = set()
        self.watchdog: threading.Thread | None = None
        self.idle = 0
        self.starting = 0  # workers started that have not looked for work yet
        self.idle_exit = _idle_exit_seconds()
        self._serial = 0

    def kick(self, lane: _ThreadLane) -> None:
        """Emitter side: a lane went from idle to busy. Never starts a worker here:
        an idle worker is woken, or the watchdog starts one (off the token path)."""
        with self.lock:
            if lane.scheduled:
                return
            lane.scheduled = True
            self._make_ready(lane, _now())
            self._ensure_watchdog()

    def forget(self, lane: _ThreadLane) -> None:
        """Stop watching a closed handler's lane, so it needs no polling."""
        with self.lock:
            if self.lingering.pop(lane, None) is not None:
                lane.scheduled = False

    def _make_ready(self, lane: _ThreadLane, now: float) -> None:
        lane.ready_at = now
        self.ready.append(lane)
        if self.idle:
            self.cond.notify()

    def _spawn(self) -> None:
        if len(self.threads) >= MAX_WORKERS:
            return
        self.starting += 1
        self._serial += 1
        thread = threading.Thread(
            target=self._work, name=f"safecallbacks-worker-{self._serial}", daemon=True
        )
        self.threads.add(thread)
        thread.start()

    def _ensure_watchdog(self) -> None:
        if self.watchdog is None:
            self.watchdog = threading.Thread(
                target=self._watch, name="safecallbacks-watchdog", daemon=True
            )
            self.watchdog.start()
        else:
            self.watch.notify()

    # --- workers ----------------------------------------------------------------

    def _work(self) -> None:
        with self.lock:
            self.starting -= 1
        while True:
            lane = self._next_lane()
            if lane is None:
                return
            try:
                lane.drain(BATCH)
            except BaseException as exc:  # our own bug: never let it kill the pool
                lane.core.observer.announce_once(
                    "internal", "internal_error", error_type=type(exc).__qualname__
                )
            finally:
                self._after_drain(lane)

    def _next_lane(self) -> _ThreadLane | None:
        with self.lock:
            idle_since = _now()
            while not self.ready:
                self.idle += 1
                self.cond.wait(self.idle_exit)
                self.idle -= 1
                if not self.ready and _now() - idle_since >= self.idle_exit:
                    self.threads.discard(threading.current_thread())
                    return None
            lane = self.ready.popleft()
            self.busy.add(lane)
            return lane

    def _after_drain(self, lane: _ThreadLane) -> None:
        with self.lock:
            self.busy.discard(lane)
            if lane.queue:
                self._make_ready(lane, _now())
            else:
                self.lingering[lane] = _now()
            self._ensure_watchdog()

    # --- the watchdog -----------------------------------------------------------

    def _watch(self) -> None:
        with self.lock:
            quiet_since = _now()
            while True:
                now = _now()
                self._poll(now)
                self._write_logs()
                if self.lingering or self.ready or self.busy or self.threads:
                    quiet_since = now
                elif now - quiet_since >= self.idle_exit * WATCHDOG_OUTLIVES:
                    # It outlives the workers, so a stream after a quiet spell has its
                    # worker started here, not on the emitting thread.
                    self.watchdog = None
                    return
                self.watch.wait(POLL_SECONDS if self.lingering or self.ready else WATCHDOG_SECONDS)

    def _write_logs(self) -> None:
        """Write lines handlers queued (a drop, a stuck delivery), with the pool lock released."""
        lanes = [*self.busy, *self.lingering, *self.ready]
        waiting = [lane.core.observer for lane in lanes if lane.core.observer.has_pending_logs()]
        if not waiting:
            return
        self.lock.release()
        try:
            for observer in waiting:
                observer.emit_pending()
        finally:
            self.lock.acquire()

    def _poll(self, now: float) -> None:
        """Move lingering lanes with new events to ready; let quiet ones go idle."""
        for lane, since in list(self.lingering.items()):
            if lane.queue:
                del self.lingering[lane]
                self._make_ready(lane, now)
            elif now - since >= LINGER_SECONDS:
                del self.lingering[lane]
                lane.scheduled = False
                if lane.queue:  # an event slipped in before the flag dropped
                    lane.scheduled = True
                    self._make_ready(lane, now)
        waited = now - self.ready[0].ready_at if self.ready else 0.0
        if (
            self.ready
            and not self.idle
            and not self.starting
            and (waited >= SPAWN_DELAY or not self.threads)
        ):
            self._spawn()  # every worker is busy, maybe hung: add one
        for lane in self.busy:
            if lane.stuck(now) and not lane.stuck_reported:
                lane.stuck_reported = True
                lane.core.observer.announce_once(
                    "stuck",
                    "handler_stuck",
                    hook=lane.inflight,
                    seconds=round(now - (lane.busy_since or now), 3),
                )


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def pool() -> _Pool:
    global _POOL
    found = _POOL
    if found is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _Pool()
            found = _POOL
    return found


def worker_threads() -> int:
    """Live worker threads of the pool (for tests and diagnostics)."""
    found = _POOL
    return 0 if found is None else len(found.threads)


# --- the shared background loop -------------------------------------------------

_BACKGROUND: asyncio.AbstractEventLoop | None = None
_BACKGROUND_LOCK = threading.Lock()


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


# --- the registry, exit and fork --------------------------------------------------


class _Registry:
    def __init__(self) -> None:
        self._items: weakref.WeakSet[Dispatcher] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, item: Dispatcher) -> None:
        with self._lock:
            self._items.add(item)

    def discard(self, item: Dispatcher) -> None:
        with self._lock:
            self._items.discard(item)

    def __iter__(self) -> Iterator[Dispatcher]:
        with self._lock:
            return iter(list(self._items))


_registry = _Registry()


def _depths() -> Iterable[tuple[str, int]]:
    for core in _registry:
        yield core.name, core.queue_depth()


register_depth_source(_depths)


def drain_at_exit() -> None:
    """Give pending events a bounded time at interpreter exit, then count the rest dropped."""
    cores = list(_registry)
    placed = [(core, core.place_barriers()) for core in cores]
    started = _now()
    lost: dict[str, int] = {}
    for core, barriers in placed:
        deadline = started + core.options.exit_timeout
        for _, barrier in barriers:
            if not barrier.wait(deadline - _now()):
                break
        core.observer.summarise()
        before = core.stats().dropped
        core.shut(reason="exit")
        if core.stats().dropped > before:
            lost[core.name] = lost.get(core.name, 0) + core.stats().dropped - before
    if lost:
        # One line for the whole process, however many handlers were still busy.
        from ._observe import logger

        logger().warning("events_dropped_at_exit", handlers=lost, total=sum(lost.values()))


def _after_fork_in_child() -> None:
    global _POOL, _BACKGROUND, _POOL_LOCK, _BACKGROUND_LOCK
    _POOL = None
    _BACKGROUND = None
    _POOL_LOCK = threading.Lock()
    _BACKGROUND_LOCK = threading.Lock()
    _registry._lock = threading.Lock()
    for core in list(_registry._items):
        core.reset_after_fork()


atexit.register(drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
