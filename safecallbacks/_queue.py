"""One handler's bounded, ordered queue towards one consumer; ``on_full``; the flush barrier.

On the token path: ``put`` appends a tuple to a ``deque`` (atomic under the
GIL) and, only when the lane was idle, asks its consumer to start. A full
queue applies ``on_full`` here too, in memory: the drop is counted, never
logged on the emitting thread. Flush barriers ride in the same queue but
never take an event's place, and ``drop_oldest`` never pops one.

``max_queue`` is exact for one emitting thread. ``put`` checks the length and
then appends without a lock (a lock here would cost every token), so with N
threads emitting into one handler at the same instant the queue can hold up
to N - 1 events more than ``max_queue``; it never grows beyond that.
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
from ._observe import Batch, Observer
from ._options import Options
from ._stopping import StopMarks

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

    async def deliver_async(self, lane: Lane, item: Item, batch: Batch) -> None: ...

    def async_call(self, hook: str) -> Callable[..., Any]: ...

    failing: bool

    def finish_async(
        self, lane: Lane, item: Item, batch: Batch, step: Any, started: float
    ) -> Awaitable[None] | None: ...

    def deliver_now(
        self, lane: Lane, item: Item, batch: Batch, calls: dict[str, Callable[..., Any]]
    ) -> Awaitable[None] | None: ...


POLL_SECONDS = 0.002  # how often a busy lane is drained: the delivery latency bound
LINGER_SECONDS = 0.05  # quiet time after which a lane goes idle (next event wakes it)
SETTLE_SLICE = 0.05  # how often a waiting flush checks whether a lane's loop has closed


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


class Lane:
    """The bounded queue of one handler towards one consumer."""

    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, engine: LaneOwner) -> None:
        self.engine = engine
        self.queue: deque[Item | Barrier] = deque()
        self.max_queue = engine.options.max_queue
        # Recorders take the slow path (``overflow``) from this depth on; thread lanes
        # lower it to nudge their worker when a backlog builds up.
        self.nudge_at = self.max_queue
        self.emitted = engine.observer.emitted
        self.scheduled = False
        self.high_water = 0
        self.busy_since: float | None = None
        self.inflight: str | None = None
        self.cut_off = False  # a delivery was cut off by its loop's shutdown (loop lanes)
        # The busy_since of a delivery a root run's end already waited for in vain: the
        # same hung delivery never costs a second wait.
        self.settle_gave_up: float | None = None
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
        """The slow half of ``put``, for recorders that found the queue long or full.

        Counts the event as emitted (the recorder's fast path leaves that to it).
        """
        if len(self.queue) < self.max_queue:
            self._count_and_append(item)
            self.nudge()
            return
        next(self.emitted)  # before its drop may be counted: pending never goes negative
        if self._make_room(item):
            self.queue.append(item)
            if not self.scheduled:
                self.kick()

    def _count_and_append(self, item: Item) -> None:
        """Ctrl-C lands between two calls: right after the count, the event is queued
        all the same, so an interrupt leaves it counted and queued, or neither."""
        queue = self.queue
        try:
            next(self.emitted)
        except BaseException:
            queue.append(item)
            raise
        queue.append(item)
        if not self.scheduled:
            self.kick()  # an interrupt before it: the next event or flush kicks

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

    def nudge(self) -> None:
        """A backlog is building up (only thread lanes act on it)."""

    def _make_room(self, item: Item) -> bool:
        """Apply ``on_full``; False when ``item`` itself was dropped."""
        engine = self.engine
        self.note_depth()
        policy = engine.options.on_full
        limit = engine.options.max_queue
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
        engine.observer.dropped(item[0], reason="queue_full")
        return False

    def _may_block(self) -> bool:
        return True

    def _wait_for_space(self) -> bool:
        limit = self.engine.options.max_queue
        with self._space:
            self._space_waiters += 1
            try:
                return self._space.wait_for(
                    lambda: len(self.queue) < limit, self.engine.options.block_timeout
                )
            finally:
                self._space_waiters -= 1

    def _discard(self, entry: Item | Barrier, reason: str) -> None:
        if isinstance(entry, Barrier):
            self.took_barrier(entry)  # everything ahead of it is gone too
        else:
            self.engine.observer.dropped(entry[0], reason=reason)

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
            self.engine.observer.dropped(hook, count, reason=reason)

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
        """Events waiting; flush and settle barriers are not counted."""
        return self.events_queued()

    def note_depth(self) -> None:
        self.high_water = max(self.high_water, self.depth())

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
    loop = asyncio.get_running_loop()
    deadline = _now() + timeout
    futures = {barrier.future(loop): lane for lane, barrier in placed}
    pending = set(futures)
    while pending and _now() < deadline:
        _, pending = await asyncio.wait(
            pending, timeout=min(SETTLE_SLICE, max(deadline - _now(), 0.0))
        )
        for fut in pending:
            futures[fut].reap_if_dead()  # releases the barrier if its loop is gone
    for fut in pending:
        fut.cancel()
    return not pending
