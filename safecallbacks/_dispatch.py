"""The per-handler engine: takes each event (fast and slow path), flushes, closes, reads stats.

One ``Engine`` stands behind each hardened handler (and one behind each
copy LangChain makes, joined to the original's *family*). On the token path
``record`` counts the event and either appends it to a lane (offload) or
calls the handler inline, isolated; the recorders the hardened class installs
inline the commonest case of this. Everything else here (flush, close,
settle, stats) runs on the caller's thread when the user asks for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ._adapt import Adaptive
from ._compat import count_value, get_running_loop
from ._hooks import END_HOOKS, PAIRED_HOOKS, START_HOOKS, is_async_callable
from ._inline import InlineCalls
from ._isolation import (
    Contained,
    Resolver,
    Suspended,
    acall_hook,
    call_hook,
    contained,
    drive_rest,
    first_step,
)
from ._lifecycle import registry
from ._loops import LoopLane, background_loop
from ._observe import Batch, Observer
from ._options import Options
from ._queue import Barrier, Item, Lane, await_settled, inside_delivery, wait_settled
from ._revisions import Revisions
from ._runs import CURRENT_SCOPE, RunMark, Strand, emitter_key, note_dropped
from ._stats import Stats, merge_stats
from ._stopping import StopMarks, StopStream
from ._workers import ThreadLane
from ._workers import forget as forget_thread_lane

_copy_context = contextvars.copy_context
_now = time.monotonic


def _failing(error: Exception) -> Callable[..., Any]:
    """A hook that could not be resolved: each call fails with why (counted, logged)."""

    def unresolved(*args: Any, **kwargs: Any) -> Any:
        raise error.with_traceback(None)

    return unresolved


class Unbound:
    """Stands in for a handler's engine until its first event: options and family to join.

    Put in place by hardened classes at construction and by copies (deep copies,
    unpickled handlers); the handler's first event makes the real engine.
    """

    __slots__ = ("options", "parent", "target")

    def __init__(self, options: Options, parent: Engine | None = None) -> None:
        self.options = options
        self.parent = parent
        self.target: object = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unbound, (self.options, None))


class Engine(Revisions):
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
        parent: Engine | None = None,
        reason: str = "",
        adaptive: bool = False,
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
        self.stops = StopMarks(self.observer.stop_too_late, self._refresh_fast_lane)
        self.stop_marks = self.stops.marks  # the same dict: one load on the token path
        self._thread_lane = ThreadLane(self)
        self._loop_lanes: dict[asyncio.AbstractEventLoop | None, LoopLane] = {}
        self._loop_lanes_lock = threading.Lock()
        self._pruned_high_water = 0
        self._high_water = 0  # never falls, whatever lanes come and go
        self.inline_counts: dict[str, itertools.count[int]] = {
            hook: itertools.count() for hook in hooks
        }
        self._hook_sets = frozenset(async_hooks), frozenset(hooks)
        self.awaited_hooks = self._awaited_hooks(*self._hook_sets)
        self.mode_reason = reason or f"mode={options.mode!r} given"
        self.wanted_mode: tuple[str, str, bool] | None = None  # a move auto asked for
        self.adapt = Adaptive(self, adaptive, options.mode, options.stall_threshold)
        self.root: Engine = parent.root if parent is not None else self
        self.members: weakref.WeakSet[Engine] = weakref.WeakSet()
        if parent is not None:
            self.root.members.add(self)
        self.fast_lane: Lane | None = None
        self.fast_loop_lanes: dict[asyncio.AbstractEventLoop | None, LoopLane] | None = None
        self.inline_ready = False
        self.bare_run_inline = False  # set by the hardened surface from the handler's class
        self.failing = False  # some failure since the last success: a success resets the breaker
        self.inline = InlineCalls(self)
        self._refresh_fast_lane()
        registry.add(self)

    def _succeeded(self) -> None:
        self.failing = False

    def _awaited_hooks(self, async_hooks: frozenset[str], hooks: frozenset[str]) -> frozenset[str]:
        """Hooks LangChain's async manager must await rather than call."""
        if self.options.mode == "inline":
            return async_hooks  # awaited as LangChain would await the bare handler
        if self.options.settle > 0:
            return frozenset(h for h in hooks if h in END_HOOKS)  # to settle the backlog
        return frozenset()

    def _refresh_fast_lane(self) -> None:
        """Which fast path recorders may take: the lane to append to, or calling inline."""
        open_ = not self.closed and self.breaker.state == "closed"
        offload = self.options.mode == "offload"
        moving = self.wanted_mode is not None
        fast = offload and not self.has_async and not self.closed and not self.stop_marks
        fast = fast and not moving
        self.fast_lane = self._thread_lane if fast else None
        # Async handlers: recorders append to the emitting loop's lane once it exists.
        fast_loops = offload and self.async_only and not self.closed and not self.stop_marks
        fast_loops = fast_loops and not moving
        self.fast_loop_lanes = self._loop_lanes if fast_loops else None
        # During a trial in the caller, inline events pass through record(), which judges it.
        self.inline_ready = self.options.mode == "inline" and open_ and not self.adapt.trial

    # --- copies --------------------------------------------------------------

    def __copy__(self) -> Engine:
        return self  # a shallow copy of a handler shares it until its first event rebinds

    def __deepcopy__(self, memo: dict[int, Any]) -> Unbound:
        return Unbound(self.requested, self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unbound, (self.requested, None))

    def family(self) -> list[Engine]:
        """This engine and, for an original handler, the engines of its copies."""
        if self.root is not self:
            return [self]
        return [self, *list(self.members)]

    # --- the token path ---------------------------------------------------

    def accept(self, hook: str, kwargs: Mapping[str, Any]) -> bool:
        """Count the event as emitted; False once closed (then it is counted dropped).

        Raises a pending ``StopStream`` for this event's run first.
        """
        if self.stop_marks:
            self.stops.check(hook, kwargs)
        next(self.observer.emitted)
        if self.closed:
            self.observer.dropped(hook, reason="closed")
            return False
        return True

    def record(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Take one event on the emitter's side (recorders inline the common case).

        Offloaded, the event is counted by the lane as it is queued or dropped, after
        everything that may be cut off (Ctrl-C): never counted and then lost.
        """
        if self.wanted_mode is not None:
            self._move_when_ready()  # before the count: cut off, nothing was counted
        if self.options.mode == "inline":
            if not self.accept(hook, kwargs):
                return
            counted = True
        else:
            if self.stop_marks:
                self.stops.check(hook, kwargs)
            if self.closed:
                self.observer.emitted_and_dropped(hook, reason="closed")
                return
            counted = False
        loop = get_running_loop()
        if self.options.mode == "inline":
            if loop is not None and self.has_async and self._is_async(hook):
                # Awaiting here would block the emitting loop: run it as an ordered task on it.
                self._loop_lane(loop).put(
                    (hook, args, kwargs, _copy_context(), _now(), loop), counted
                )
            elif self.adapt.trial:
                self.adapt.trial_result(hook, self.inline.call(hook, args, kwargs))
            else:
                self.inline.call(hook, args, kwargs)
            return
        lane: Lane = self._loop_lane(loop) if self.async_only else self._thread_lane
        item = (hook, args, kwargs, _copy_context(), _now(), loop)
        if hook in START_HOOKS:
            lane.put_run(self._run_mark(kwargs, ends=False), item, counted)
        else:
            lane.put(item, counted)

    def mark_run(self, kwargs: Mapping[str, Any], ends: bool) -> None:
        """A run's start or end the handler does not implement: routing must know of it."""
        if self.options.mode != "offload" or self.closed:
            return
        lane: Lane = self._loop_lane(get_running_loop()) if self.async_only else self._thread_lane
        lane.put_mark(self._run_mark(kwargs, ends))

    def _run_mark(self, kwargs: Mapping[str, Any], ends: bool) -> RunMark:
        run_id, parent = kwargs.get("run_id"), kwargs.get("parent_run_id")
        if ends:
            return RunMark(run_id, parent, None, ends)
        scope = CURRENT_SCOPE.get()
        if scope is not None:
            scope.saw(self)
        key = emitter_key(self.async_only, self.bare_run_inline)
        return RunMark(run_id, parent, key, ends, scope)

    async def adeliver(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """What LangChain's async manager awaits for a hook in ``awaited_hooks``."""
        if self.options.mode == "inline":
            await self.inline.acall(hook, args, kwargs)
            return
        self.record(hook, args, kwargs)
        if kwargs.get("parent_run_id") is None:
            await self.asettle(kwargs.get("run_id"))

    async def asettle_after(self, hook: str, kwargs: Mapping[str, Any]) -> None:
        """An end hook the handler lacks, on the async path: settle after a root run."""
        self.stops.end_emitted(hook, kwargs)
        self.mark_run(kwargs, ends=True)
        if kwargs.get("parent_run_id") is None:
            await self.asettle(kwargs.get("run_id"))

    def _is_async(self, hook: str) -> bool:
        try:
            return is_async_callable(self.resolve(hook))
        except Exception:
            return False

    def settle_now(self, run: Any = None) -> None:
        """A root run ended on a sync emitter: wait up to ``settle`` for its deliveries.

        Not inside a delivery (a run started by a hook): that backlog waits for it.
        """
        if self.wanted_mode is not None and self._thread_lane.parked:
            self.take_over()
        if self._is_stuck() or inside_delivery():
            return
        deadline = _now() + self.options.settle
        here = get_running_loop()
        for lane, barrier in self._settle_barriers(run):
            if here is not None and lane.loop is here:
                continue  # that loop can only drain once this caller returns
            if lane is self._thread_lane and not self.adapt.final:
                settled = self._settle_or_take_over(barrier, deadline)
            else:
                settled = wait_settled(lane, barrier, deadline)
            if not settled:
                lane.settle_gave_up = lane.busy_since

    async def asettle(self, run: Any = None) -> None:
        """``settle_now`` for async emitters: waits without blocking the loop."""
        if self.wanted_mode is not None and self._thread_lane.parked:
            self.take_over()
        if self.options.settle <= 0 or self._is_stuck() or inside_delivery():
            return
        placed = self._settle_barriers(run)
        if placed and not await await_settled(placed, self.options.settle):
            for lane, barrier in placed:
                if not barrier.done():
                    lane.settle_gave_up = lane.busy_since

    def _settle_barriers(self, run: Any) -> list[tuple[Lane, Barrier]]:
        """Barriers for ``run`` in the lanes that may hold some of it: idle ones need no wait."""
        placed = []
        for lane in self.lanes():
            if lane.scheduled or lane.queue:
                barrier = Barrier(run)
                lane.put_barrier(barrier)
                placed.append((lane, barrier))
        return placed

    def _is_stuck(self) -> bool:
        now = _now()
        threshold = self.options.stall_threshold
        for lane in self.lanes():
            since = lane.busy_since
            if since is not None and (now - since > threshold or since == lane.settle_gave_up):
                return True
        return False

    # --- lanes -------------------------------------------------------------

    def _loop_lane(self, loop: asyncio.AbstractEventLoop | None) -> LoopLane:
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
                lane = LoopLane(self, target, background=loop is None)
                self._loop_lanes[target] = lane
            # Sync emitters look the background lane up under None.
            self._loop_lanes[loop] = lane
            return lane

    def lanes(self) -> list[Lane]:
        """Every lane, after accounting for and forgetting those of closed loops."""
        if not self._loop_lanes:  # a sync handler's, always: asked at every root run's end
            return [self._thread_lane]
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
        """The callable a worker runs for ``hook`` (resolved once per drain)."""
        return self.adapt.probing(hook, self._callable(hook, call_hook))

    def async_call(self, hook: str) -> Callable[..., Any]:
        """The callable a loop consumer calls for ``hook`` (resolved once per drain)."""
        return self._callable(hook, acall_hook)

    def _callable(self, hook: str, through: Callable[..., Any]) -> Callable[..., Any]:
        if hook == "on_chat_model_start":
            # Through call_hook / acall_hook for LangChain's on_llm_start fallback.
            resolve, target = self.resolve, self.target

            def chat_model_start(*args: Any, **kwargs: Any) -> Any:
                return through(resolve, target, hook, args, kwargs)

            return chat_model_start
        try:
            return self.resolve(hook)
        except Exception as exc:  # resolved outside the per-event isolation: never lose the
            return _failing(exc)  # event taken, fail each event that needed it instead

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

    async def deliver_async(self, lane: Lane, strand: Strand, item: Item, batch: Batch) -> None:
        """Deliver one event to an async handler on this loop, inside the calling task."""
        rest = self.deliver_now(lane, strand, item, batch, {})
        if rest is not None:
            await rest

    def deliver_now(
        self,
        lane: Lane,
        strand: Strand,
        item: Item,
        batch: Batch,
        calls: dict[str, Callable[..., Any]],
    ) -> Awaitable[None] | None:
        """Start delivering one event to an async handler, in the event's context.

        Most handler coroutines finish in their first step, which runs here,
        synchronously: then the event is settled and None returned. Otherwise
        what is returned must be awaited (in the consumer task) to finish it.
        """
        hook, args, kwargs, context, _, _ = item
        run_id = kwargs.get("run_id")
        if hook in START_HOOKS:
            self.stops.remember_parent(run_id, kwargs)
        if self.breaker.state != "closed" and not self.observer.admit(hook, run_id, batch):
            return None
        call = calls.get(hook)
        if call is None:
            call = calls[hook] = self.async_call(hook)
        started = _now()
        strand.busy_since, strand.inflight = started, hook
        step = first_step(call, args, kwargs, context)
        return self.finish_async(lane, strand, item, batch, step, started)

    def finish_async(
        self,
        lane: Lane,
        strand: Strand,
        item: Item,
        batch: Batch,
        step: BaseException | Suspended | None,
        started: float,
    ) -> Awaitable[None] | None:
        """Settle a delivery after its first step, or return what must be awaited to."""
        if isinstance(step, Suspended):
            return self._deliver_rest(lane, strand, item, batch, step, started)
        self._settle_async(strand, item, batch, step, started)
        return None

    async def _deliver_rest(
        self,
        lane: Lane,
        strand: Strand,
        item: Item,
        batch: Batch,
        suspended: Suspended,
        started: float,
    ) -> None:
        try:
            options = self.options
            error = await drive_rest(suspended, item[3], options.timeout, options.exit_timeout)
        except asyncio.CancelledError:
            # The consumer itself is being cancelled (its loop is shutting down, or the
            # exit budget ran out): the handler did not fail, the event was cut off.
            strand.busy_since, strand.inflight = None, None
            lane.cut_off = True  # what is queued behind it is dropped too: never a hole
            self.observer.dropped(item[0], reason="shutdown")
            note_dropped(strand, item[0])
            raise
        # GeneratorExit here is never the handler's: the loop was closed with this
        # consumer pending and it is being thrown away; reap_if_dead() accounts for it.
        self._settle_async(strand, item, batch, error, started)

    def _settle_async(
        self, strand: Strand, item: Item, batch: Batch, error: BaseException | None, started: float
    ) -> None:
        strand.busy_since, strand.inflight = None, None
        hook, args, kwargs, context, emitted_at, _ = item
        run_id = kwargs.get("run_id")
        if isinstance(error, StopStream):
            self.stops.mark(hook, run_id, error)
            error = None
        if hook in END_HOOKS:
            self.stops.run_ended(run_id)
        if error is None and not self.failing and not self.breaker.consecutive:
            # The common case, without a call per event: nothing to reset.
            if hook in PAIRED_HOOKS:
                self.observer.track_run(hook, run_id)
            batch.durations.append(_now() - started)
            batch.lags.append(started - emitted_at)
            batch.hooks.append(hook)
            return
        self.observer.add_result(
            batch, hook, run_id, error, started, emitted_at, args, kwargs, context
        )

    # --- flush, close, stats ------------------------------------------------

    def place_barriers(self, busy_only: bool = False) -> list[tuple[Lane, Barrier]]:
        """A flush barrier in each lane (``busy_only``: in lanes holding something)."""
        placed = []
        for lane in self.lanes():
            if busy_only and lane.idle() and not lane.scheduled:
                continue
            barrier = Barrier()
            lane.put_barrier(barrier)
            placed.append((lane, barrier))
        return placed

    def _family_barriers(self) -> list[tuple[Lane, Barrier]]:
        return [placed for engine in self.family() for placed in engine.place_barriers()]

    def flush(self, timeout: float, what: str = "flush") -> bool:
        refuse_in_a_loop(what)
        if self.wanted_mode is not None and self._thread_lane.parked:
            self.take_over()
        deadline = _now() + timeout
        ok = True
        for lane, barrier in self._family_barriers():
            ok = wait_settled(lane, barrier, deadline) and ok
        self._after_flush(ok, timeout)
        return ok

    async def aflush(self, timeout: float) -> bool:
        ok = await await_settled(self._family_barriers(), timeout)
        self._after_flush(ok, timeout)
        return ok

    def _after_flush(self, ok: bool, timeout: float) -> None:
        for engine in self.family():
            engine.observer.summarise()
        if not ok:  # the caller learns it from the result; the log says what is left
            self.observer.flush_timed_out(self.stats().pending, timeout)

    def close(self, timeout: float, what: str = "close") -> bool:
        ok = self.flush(timeout, what) if not self.closed else True
        for engine in self.family():
            engine.shut(reason="closed")
        return ok

    async def aclose(self, timeout: float) -> bool:
        ok = await self.aflush(timeout) if not self.closed else True
        for engine in self.family():
            engine.shut(reason="closed")
        return ok

    def shut(self, reason: str) -> None:
        """Stop taking events; count whatever is still queued as dropped."""
        self.closed = True
        self._refresh_fast_lane()
        for lane in self.lanes():
            lane.discard_all(reason)  # a delivery in flight still finishes and is counted
        forget_thread_lane(self._thread_lane)
        registry.discard(self)

    def stats(self) -> Stats:
        """This engine's snapshot, with its copies' counts added for an original handler."""
        own = self._own_stats()
        members = self.family()[1:]
        if not members:
            return own
        others = [engine._own_stats() for engine in members]
        durations = [engine.observer.estimators() for engine in self.family()]
        return merge_stats(own, others, durations)

    def _own_stats(self) -> Stats:
        now = _now()
        queued: Counter[str] = Counter()
        depth = 0
        stuck = False
        lanes = self.lanes()
        high = self._pruned_high_water
        for lane in lanes:
            queued.update(lane.queued_by_hook())
            depth += lane.depth()
            high = max(high, lane.high_water)
            stuck = stuck or lane.stuck(now)
        high = self._high_water = max(self._high_water, high, depth)
        self.observer.emit_pending()  # the caller's thread, never the token path
        inline = Batch()
        for hook, counter in self.inline_counts.items():
            count = count_value(counter)
            if count:
                inline.settled[hook] = count
        return self.observer.snapshot(
            sum(inline.settled.values()),
            self.options.mode,
            self.mode_reason,
            queued,
            depth,
            max(high, depth),
            stuck,
            self.closed,
            live=lambda: [inline, *(batch for lane in lanes for batch in lane.live_batches())],
        )

    def queue_depth(self) -> int:
        return sum(lane.depth() for lane in self.lanes())

    def reset_after_fork(self) -> None:
        self.observer.reset_after_fork()
        self.emitted = self.observer.emitted
        self.breaker = self.observer.breaker
        self.inline_counts = {hook: itertools.count() for hook in self.inline_counts}
        self.stops.clear()
        self._thread_lane = ThreadLane(self)
        self._loop_lanes = {}
        self._loop_lanes_lock = threading.Lock()
        self._refresh_fast_lane()


_ASYNC_ALTERNATIVE = {
    "flush": "await safecallbacks.aflush(handler)",
    "close": "await safecallbacks.aclose(handler)",
    "__exit__": "async with handler: ...",
}


def refuse_in_a_loop(what: str) -> None:
    """Blocking waits cannot work inside a running event loop: say so, name the way out.

    The loop they would block may be the one that must deliver (async handlers), and
    for other handlers it would freeze every task on it for up to ``timeout``.
    """
    if get_running_loop() is not None:
        raise RuntimeError(
            f"safecallbacks: a blocking {what}() was called inside a running event loop, "
            f"where it would block the loop it waits for; use "
            f"`{_ASYNC_ALTERNATIVE.get(what, 'the async variant')}` instead"
        )
