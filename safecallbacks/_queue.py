"""One handler's bounded queue towards its consumers; ``on_full`` and shedding; barriers.

On the token path: ``put`` appends a tuple to a ``deque`` (atomic under the
GIL) and, only when the lane was idle, asks its consumer to start. Consumers
route what is queued to strands (``_runs``); the queue and the strands
together are what ``max_queue`` bounds. A full queue applies ``on_full`` on
the emitter, in memory, under the router's lock (never a handler's): tokens
are shed before a run's start or end, and every drop is counted, never logged
on the emitting thread. Barriers and run marks ride in the same queue but
never take an event's place.

``max_queue`` is exact for one emitting thread. ``put`` checks the length and
then appends without a lock (a lock here would cost every token), so with N
threads emitting into one handler at the same instant the queue can hold up
to N - 1 events more than ``max_queue``; it never grows beyond that, but for
the ends of runs whose start it holds.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeAlias

from ._adapt import Adaptive
from ._compat import count_value
from ._hooks import END_HOOKS
from ._interrupts import held_interrupts
from ._observe import Batch, Observer
from ._options import Options
from ._runs import RUN_BOUNDARIES, Router, RunMark, Strand
from ._stopping import StopMarks
from ._wakeups import call_soon_from_thread

_now = time.monotonic

Item: TypeAlias = tuple[
    str,  # hook
    tuple[Any, ...],  # args
    dict[str, Any],  # kwargs
    contextvars.Context,  # the emitter's context, entered for delivery
    float,  # emitted at (monotonic)
    "asyncio.AbstractEventLoop | None",  # the emitting loop
]
"""One queued event."""


_DELIVERY_THREAD = threading.local()
CONSUMER_TASKS: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()
"""Loop lanes' consumer tasks: a hook they run is inside a delivery."""


def mark_delivery_thread() -> None:
    """Called once by each worker thread: everything it runs is a delivery."""
    _DELIVERY_THREAD.on = True


def inside_delivery() -> bool:
    """True when the caller is a handler's hook being delivered (a worker or a consumer task).

    A run started inside a hook ends inside that delivery: waiting there for the
    handler's backlog would wait for the delivery that is waiting.
    """
    if getattr(_DELIVERY_THREAD, "on", False):
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop on this thread
        return False
    return task is not None and task in CONSUMER_TASKS


class LaneOwner(Protocol):
    """What a lane and its consumer need from the engine that owns them."""

    options: Options
    observer: Observer
    stops: StopMarks
    adapt: Adaptive
    wanted_mode: tuple[str, str, bool] | None  # (mode, reason, after a thread-bound failure)

    def sync_call(self, hook: str) -> Callable[..., Any]: ...

    def await_elsewhere(self, awaitable: Any, loop: asyncio.AbstractEventLoop | None) -> None: ...

    async def deliver_async(self, lane: Lane, strand: Strand, item: Item, batch: Batch) -> None: ...

    def async_call(self, hook: str) -> Callable[..., Any]: ...

    failing: bool

    def finish_async(
        self, lane: Lane, strand: Strand, item: Item, batch: Batch, step: Any, started: float
    ) -> Awaitable[None] | None: ...

    def deliver_now(
        self,
        lane: Lane,
        strand: Strand,
        item: Item,
        batch: Batch,
        calls: dict[str, Callable[..., Any]],
    ) -> Awaitable[None] | None: ...


POLL_SECONDS = 0.002  # how often a busy lane is drained: the delivery latency bound
LINGER_SECONDS = 0.05  # quiet time after which a lane goes idle (next event wakes it)
SETTLE_SLICE = 0.05  # how often a waiting flush checks whether a lane's loop has closed


class Barrier:
    """A marker placed at the tail of a lane; released once everything before it is done.

    Routed into each strand holding something (``Part``s); a settle barrier (``run``
    set) only into the strand of that root run. It is released when every part is.
    """

    __slots__ = ("_callbacks", "_event", "_lock", "_parts", "_released", "run", "scopes")

    def __init__(self, run: Any = None, scopes: frozenset[Any] | None = None) -> None:
        self.run = run
        self.scopes = scopes  # a scope's flush: only the strands of these scopes
        self._lock = threading.Lock()
        self._released = False
        # Made for the first thread that waits: most barriers (the ends of async root
        # runs) are awaited through ``future`` and never need one.
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._parts = 0

    def expect(self, parts: int) -> None:
        """Routed: released once ``parts`` parts are (at once when there are none)."""
        with self._lock:
            self._parts = parts
        if parts == 0:
            self.release()

    def add_parts(self, more: int) -> None:
        """A part not yet reached was split in ``more + 1`` (``Router._unmerge``)."""
        with self._lock:
            self._parts += more

    def release_part(self) -> None:
        with self._lock:
            self._parts -= 1
            last = self._parts <= 0
        if last:
            self.release()

    def release(self) -> None:
        with self._lock:
            self._released = True
            event = self._event
            callbacks, self._callbacks = self._callbacks, []
        if event is not None:
            event.set()
        for callback in callbacks:
            callback()

    def done(self) -> bool:
        return self._released

    def wait(self, timeout: float) -> bool:
        with self._lock:
            if self._released:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(max(timeout, 0.0))

    def future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def notify() -> None:
            call_soon_from_thread(loop, resolve)

        with self._lock:
            if not self._released:
                self._callbacks.append(notify)
                return fut
        fut.set_result(None)
        return fut


class Lane:
    """The bounded queue of one handler towards one consumer, routed to strands (``_runs``)."""

    loop: asyncio.AbstractEventLoop | None = None
    default_concurrency = 32  # deliveries at once when ``max_concurrency`` is not given
    # Whether quick deliveries of many runs share one strand (``Router.merges``), for
    # which the consumer pops a chunk's head only once it is delivered.
    merges = False
    pops_after = False

    def __init__(self, engine: LaneOwner) -> None:
        self.engine = engine
        self.queue: deque[Any] = deque()
        self.max_queue = engine.options.max_queue
        given = engine.options.max_concurrency
        self.concurrency = self.default_concurrency if given is None else given
        self.router = Router(self, serial=self.concurrency == 1)
        # Recorders take the slow path (``overflow``) from this depth on: the room left
        # once routed events are counted, or lower, where a lane wants to be nudged.
        self.nudge_want = self.nudge_at = self.max_queue
        self.emitted = engine.observer.emitted
        self.scheduled = False
        self.high_water = 0
        self.cut_off = False  # a delivery was cut off by its loop's shutdown (loop lanes)
        self.settle_gave_up: float | None = None  # see Strand.settle_gave_up
        self.ready_at = 0.0
        self.batch = Batch()  # results of deliveries made outside strands (loop shutdown)
        self._space = threading.Condition(threading.Lock())
        self._space_waiters = 0
        # Barriers and run marks never take an event's place: they are counted apart.
        self._controls_in = itertools.count()
        self._controls_out = itertools.count()

    # --- emitting side ---------------------------------------------------

    def put(self, item: Item, counted: bool = False) -> None:
        """Count the event as emitted and queue it, or count it dropped (``on_full``).

        Ctrl-C lands between two calls: what may be cut off (making room) comes first
        and counts nothing, then the event is counted and queued, or counted and
        dropped, each as one step an interrupt cannot split (``_count_and_append``).
        ``counted``: the caller counted it already (a move between modes is pending).
        """
        if self._full() and not self._make_room(item):
            self._refused(item, counted)
            return
        self._count_and_append(item, counted)

    def put_run(self, mark: RunMark, item: Item | None, counted: bool = False) -> None:
        """A run's start: its mark, then its event (if the handler implements it).

        A start that finds no room sheds its whole run (the mark says so), so the
        handler never gets a run's end or tokens without its start. An interrupt
        between the mark and the event leaves a run whose start was never emitted.
        """
        if item is not None and self._full() and not self._make_room(item):
            mark.shed = True
            self._put_control(mark)
            self._refused(item, counted)
            if not self.scheduled:
                self.kick()
            return
        self._put_control(mark)
        if item is not None:
            self._count_and_append(item, counted)
        elif not self.scheduled:
            self.kick()

    def put_mark(self, mark: RunMark) -> None:
        self._put_control(mark)
        if not self.scheduled:
            self.kick()

    def _full(self) -> bool:
        return len(self.queue) >= self.nudge_at and self.backlog() >= self.max_queue

    def _put_control(self, entry: Any) -> None:
        queue = self.queue
        try:  # counted and queued, or neither, whatever lands between them
            next(self._controls_in)
        except BaseException:
            queue.append(entry)
            raise
        queue.append(entry)

    def count_control(self) -> None:
        """A barrier or run mark is queued again (put back in front)."""
        next(self._controls_in)

    def overflow(self, item: Item) -> None:
        """The slow half of ``put``, for recorders that found the queue long or full.

        Counts the event as emitted (the recorder's fast path leaves that to it), only
        once it is known to be queued or dropped: an interrupt while room is made
        (``_make_room``) leaves the event uncounted and unqueued.
        """
        if self.events_queued() + self.router.routed() < self.max_queue:  # O(1), may overcount
            self._count_and_append(item)
            self.nudge()
            return
        if self._make_room(item):
            self._count_and_append(item)
        else:
            self._refused(item)

    def _count_and_append(self, item: Item, counted: bool = False) -> None:
        """Ctrl-C lands between two calls: right after the count, the event is queued
        all the same, so an interrupt leaves it counted and queued, or neither."""
        queue = self.queue
        if not counted:
            try:
                next(self.emitted)
            except BaseException:
                queue.append(item)
                raise
        queue.append(item)
        if not self.scheduled:
            self.kick()  # an interrupt before it: the next event or flush kicks

    def _refused(self, item: Item, counted: bool = False) -> None:
        """``item`` finds no room: counted emitted and dropped in one step (Ctrl-C safe)."""
        if counted:
            self.engine.observer.dropped(item[0], reason="queue_full")
        else:
            self.engine.observer.emitted_and_dropped(item[0], "queue_full")
        scope = self.router.scope_of(item)
        if scope is not None:
            scope.dropped_unrouted(item[0])

    def put_barrier(self, barrier: Barrier) -> None:
        self._put_control(barrier)
        if not self.scheduled:
            self.kick()

    def took_barrier(self, barrier: Barrier) -> None:
        """A barrier left the queue without being routed (discarded): release it."""
        barrier.release()

    def control_left(self) -> None:
        """A barrier or run mark left the queue (routed, or discarded)."""
        next(self._controls_out)

    def events_queued(self) -> int:
        """Events waiting to be routed (exact, unlike ``len(queue)``)."""
        controls = count_value(self._controls_in) - count_value(self._controls_out)
        return max(len(self.queue) - controls, 0)

    def backlog(self) -> int:
        """Events waiting, routed or not; what ``max_queue`` bounds."""
        return self.events_queued() + self.router.backlog()

    def room_changed(self, routed: int) -> None:
        """Routing moved events out of the queue: the fast path may take what is left."""
        self.nudge_at = max(min(self.nudge_want, self.max_queue - routed), 0)

    def kick(self) -> None:
        raise NotImplementedError

    def nudge(self) -> None:
        """A backlog is building up (only thread lanes act on it)."""

    def _make_room(self, item: Item) -> bool:
        """Apply ``on_full``, shedding other events before a run's start or end.

        False when ``item`` itself must be dropped (the caller counts it: nothing of
        ``item`` is counted here, so an interrupt leaves it neither counted nor
        queued). A run's end is kept even beyond ``max_queue`` when nothing else can
        go: its start was kept. Routing and shedding change several things at once
        under the router's lock: Ctrl-C is held back until they are done
        (``held_interrupts``); a ``block`` wait stays interruptible.
        """
        engine = self.engine
        policy = engine.options.on_full
        limit = engine.options.max_queue
        boundary = item[0] in RUN_BOUNDARIES
        if policy == "drop_newest" and not boundary:
            depth = self.backlog()  # a token that finds it full: dropped, no routing needed
            self.high_water = max(self.high_water, depth)
            return depth < limit
        router = self.router
        with held_interrupts(), router.lock:
            router.pump()
            self.note_depth()
            if self.backlog() < limit:
                return True
            sheds_now = policy == "drop_oldest" or (policy == "drop_newest" and boundary)
            if sheds_now and router.shed_token(oldest=policy == "drop_oldest"):
                return True
        if policy == "block" and self._may_block() and self._wait_for_space():
            return True
        if policy == "block" and boundary:
            with held_interrupts(), router.lock:
                if router.shed_token(oldest=False):
                    return True
        return item[0] in END_HOOKS

    def _may_block(self) -> bool:
        return True

    def _wait_for_space(self) -> bool:
        limit = self.engine.options.max_queue
        with self._space:
            self._space_waiters += 1
            try:
                return self._space.wait_for(
                    lambda: self.backlog() < limit, self.engine.options.block_timeout
                )
            finally:
                self._space_waiters -= 1

    def _popped(self) -> None:
        if self._space_waiters:
            with self._space:
                self._space.notify_all()

    # --- both sides -------------------------------------------------------

    def discard_all(self, reason: str) -> None:
        """Count every queued event as dropped (closing, a dead loop, exit)."""
        dropped: Counter[str] = Counter()
        with held_interrupts():  # (close, exit) every entry taken out is counted
            self._discard_all(reason, dropped)

    def _discard_all(self, reason: str, dropped: Counter[str]) -> None:
        with self.router.lock:
            while True:
                try:
                    entry = self.queue.popleft()
                except IndexError:
                    break
                kind = entry.__class__
                if kind is tuple:
                    dropped[entry[0]] += 1
                    scope = self.router.scope_of(entry, on_emitter=False)
                    if scope is not None:
                        scope.dropped_unrouted(entry[0])
                    continue
                self.control_left()
                if kind is Barrier:
                    self.took_barrier(entry)
            dropped.update(self.router.discard_all(reason))
            self.room_changed(self.router.routed())
        for hook, count in dropped.items():
            self.engine.observer.dropped(hook, count, reason=reason)

    def queued_by_hook(self) -> Counter[str]:
        while True:
            try:
                entries = list(self.queue)
                break
            except RuntimeError:  # mutated while copying; try again
                continue
        found = Counter(e[0] for e in entries if e.__class__ is tuple)
        found.update(self.router.queued_by_hook())
        return found

    def depth(self) -> int:
        """Events waiting; barriers and run marks are not counted."""
        return self.backlog()

    def note_depth(self) -> None:
        self.high_water = max(self.high_water, self.depth())

    def live_batches(self) -> list[Batch]:
        return [self.batch, *self.router.batches()]

    @property
    def busy_since(self) -> float | None:
        """When the oldest delivery in flight started (None: none is)."""
        found = [s.busy_since for s in self.router.busy_strands() if s.busy_since is not None]
        return min(found) if found else None

    @property
    def inflight(self) -> str | None:
        for strand in self.router.busy_strands():
            if strand.inflight is not None:
                return strand.inflight
        return None

    def idle(self) -> bool:
        """Nothing queued, routed or in flight."""
        return not self.queue and self.router.idle()

    def holds_work(self) -> bool:
        return bool(self.queue) or bool(self.router.runnable)

    def reap_if_dead(self) -> None:
        """Account for events nobody will deliver any more (only loop lanes can lose theirs)."""

    def stuck(self, now: float) -> bool:
        since = self.busy_since
        return since is not None and now - since > self.engine.options.timeout


def wait_settled(lane: Lane, barrier: Barrier, deadline: float) -> bool:
    """Wait for ``barrier``; a lane whose loop closes meanwhile is settled by reaping it."""
    while not barrier.wait(min(SETTLE_SLICE, deadline - _now())):
        lane.reap_if_dead()
        if barrier.done():
            return True
        if _now() >= deadline:
            return False
    return True


async def await_settled(placed: list[tuple[Lane, Barrier]], timeout: float) -> bool:
    """``wait_settled`` for async code, for several lanes at once, without blocking the loop."""
    if all(barrier.done() for _, barrier in placed):
        return True  # delivered already: no future, no timer, no wake-up
    loop = asyncio.get_running_loop()
    deadline = _now() + timeout
    futures = {barrier.future(loop): (lane, barrier) for lane, barrier in placed}
    pending = {fut for fut in futures if not fut.done()}
    while pending and _now() < deadline:
        _, pending = await asyncio.wait(
            pending, timeout=min(SETTLE_SLICE, max(deadline - _now(), 0.0))
        )
        for fut in pending:
            futures[fut][0].reap_if_dead()  # releases the barrier if its loop is gone
        # A released barrier whose wake-up a Ctrl-C cut off: seen at the next slice.
        pending = {fut for fut in pending if not futures[fut][1].done()}
    for fut in pending:
        fut.cancel()
    return not pending
