"""Sync delivery: the shared worker pool, its watchdog, and the drain loop of a lane.

Workers only drain lanes. A lane's strands (``_runs``) each go to one worker
at a time, so each emitter's events arrive in order; up to ``max_concurrency``
workers drain one lane while its deliveries are slow, one worker claims many
strands at once while they are quick, and a hung delivery only ever holds its
own worker (the watchdog hands the strands queued behind it to others). While
a lane has traffic it "lingers": the watchdog polls it every
few milliseconds instead of being woken per event, so a CPU-bound stream pays
no wake-up or GIL hand-off per token. Threads are started by the watchdog or
by workers, never on the token path; the emitter-side calls here are
``Pool.kick`` when a lane goes from idle to busy, and ``ThreadLane.nudge`` when
a backlog builds up (a 0.2 ms sleep at most every 5 ms that hands the GIL to
the worker, which a busy event loop would otherwise keep to itself).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ._compat import fork_safe
from ._hooks import END_HOOKS, PAIRED_HOOKS, START_HOOKS
from ._observe import WAITING_TO_LOG, write_waiting_logs
from ._queue import LINGER_SECONDS, POLL_SECONDS, Lane, mark_delivery_thread
from ._runs import SLOW, STALLED, Strand
from ._stopping import StopStream

_now = time.monotonic
_sleep = time.sleep

NUDGE_AT = 256  # queued events (and each further such many) at which an emitter nudges
NUDGE_EVERY = 0.005  # at most one nudge this often, over every lane of the process
NUDGE_SLEEP = 0.0002  # how long a nudging emitter lets go of the GIL
_LAST_NUDGE = [0.0]
BATCH = 512  # events one worker takes from one lane before giving others a turn
COMMIT_AT = 512  # deliveries a strand's results gather before they are committed
MANY = 64  # strands one worker claims at once while deliveries are quick
MIXED = 4  # calls in a chunk from which half of them slow make it slow
WATCHDOG_SECONDS = 0.25  # how often stuck deliveries are looked for
SLOW_POLL = 0.01  # how often, while some lane's deliveries are slow
BUSY_POLL = 0.05  # how often, while workers deliver (a stuck one is found this soon)
SPAWN_DELAY = 0.01  # a ready lane waiting this long with every worker busy gets a new worker
MAX_WORKERS = 64
WATCHDOG_OUTLIVES = 12  # the watchdog stays this many worker idle-exit times after them
IDLE_EXIT_ENV = "SAFECALLBACKS_WORKER_IDLE"


class ThreadLane(Lane):
    """Drained by the shared worker pool: up to ``max_concurrency`` workers, a strand each."""

    merges = True
    pops_after = True

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        # Set when auto wants the handler back on its caller's thread: workers leave
        # what is queued to the emitter, which delivers it there (Engine.take_over).
        self.parked = False
        self.nudge_base = max(min(NUDGE_AT, self.max_queue // 4), 1)
        self.nudge_want = self.nudge_at = self.nudge_base
        self.holders = 0  # workers draining this lane now
        self.waiting: dict[int, deque[Strand]] = {}  # per worker: strands claimed, not started
        self.slots = 0  # times this lane waits in the pool's ready queue
        self.taken: object | None = None  # who took it over (Engine.take_over), until released

    def kick(self) -> None:
        pool().kick(self)

    def limit(self) -> int:
        """Strands delivered at once: one while auto still probes the first deliveries."""
        adapt = self.engine.adapt
        return 1 if adapt.probes > 0 and not adapt.final else self.concurrency

    def nudge(self) -> None:
        """Give this lane's worker the GIL for a moment: a backlog is building up.

        A thread that lets go of the GIL around I/O and takes it straight back (an
        event loop around each ``select``) wins every race for it, and threads
        waiting for the GIL do not ask for it while such switches happen: under a
        busy loop a worker could wait for hundreds of milliseconds while the
        backlog grows to ``max_queue``. So the emitter, once per ``NUDGE_AT``
        more events queued and at most once per ``NUDGE_EVERY`` in the process,
        makes the lane ready and sleeps ``NUDGE_SLEEP``. A lane whose handler has
        been busy past ``stall_threshold`` is stuck, not starved: never nudged.
        """
        self.nudge_want = min(len(self.queue) + self.nudge_base, self.max_queue)
        self.nudge_at = max(min(self.nudge_want, self.max_queue - self.router.routed()), 0)
        now = _now()
        if now - _LAST_NUDGE[0] < NUDGE_EVERY:
            return
        since = self.busy_since
        if since is not None and now - since > self.engine.options.stall_threshold:
            return
        _LAST_NUDGE[0] = now
        pool().wake(self)
        _sleep(NUDGE_SLEEP)

    def drain(self, budget: int) -> None:
        """Claim runnable strands and deliver them, up to ``budget`` events in all."""
        self.nudge_want = self.nudge_base  # a worker got its turn: nudge afresh
        routed = self.router.routed()
        # len(queue) bounds the exact count from above: read that (two reprs) only past it.
        high = self.high_water
        if len(self.queue) + routed > high and self.events_queued() + routed > high:
            self.note_depth()
        router = self.router
        plans: dict[str, _Plan] = {}
        waiting: deque[Strand] = deque()  # claimed, not started: the watchdog may take them back
        self.waiting[threading.get_ident()] = waiting
        done: list[Strand] = []
        began = _now()
        try:
            while budget > 0 and not self.parked:
                slow = router.slow()
                claimed = router.claim(
                    self.limit(), done, _now() - began, 1 if slow else MANY, alone=slow, judge=False
                )
                done = []
                if not claimed:
                    return
                if slow and router.runnable and self.holders + self.slots < self.limit():
                    pool().spread(self)
                began = _now()
                waiting.extend(claimed)
                budget -= self._deliver(waiting, done, plans)
        finally:
            del self.waiting[threading.get_ident()]
            for strand in (*done, *waiting):
                router.release(strand, _now() - began, judge=False)
            if self._space_waiters:
                self._popped()

    def take_back(self) -> None:
        """Watchdog: a delivery is stuck; strands claimed behind it go to other workers."""
        for waiting in list(self.waiting.values()):
            self.hand_back(waiting)

    def hand_back(self, waiting: deque[Strand]) -> None:
        """Release strands claimed but not begun (popped here or by their worker: once)."""
        while True:
            try:
                strand = waiting.popleft()
            except IndexError:
                break
            self.router.release(strand, resize=False)

    def _deliver(self, waiting: deque[Strand], done: list[Strand], plans: dict[str, _Plan]) -> int:
        """Deliver the chunks of the strands in ``waiting``, one strand after another
        (each moves to ``done`` as it begins); the events delivered or skipped.

        Kept lean on purpose: while deliveries are quick a chunk holds one or two
        events of each of many interleaved runs, so what is per strand costs as much
        as what is per event. Per event: the handler call in the event's context, two
        attribute stores that let the watchdog see it in flight, a clock read and
        three appends. What depends only on the hook is looked up once per drain
        (``_Plan``), and counts, timings and outcomes are settled per batch by
        ``commit``. A strand whose calls were slow sends the strands claimed behind
        it to other workers.
        """
        engine = self.engine
        stops = engine.stops
        observer = engine.observer
        breaker = observer.breaker
        router = self.router
        delivered = 0
        plan_hook: str | None = None  # the hook of the plan in hand: most events repeat it
        plan: _Plan | None = None
        while True:
            try:
                strand = waiting.popleft()
            except IndexError:
                return delivered
            done.append(strand)
            chunk = strand.chunk
            popleft = chunk.popleft
            batch = strand.batch
            durations, lags, hooks = batch.durations, batch.lags, batch.hooks
            started = strand.claimed_at = _now()  # the watchdog judges the chunk's pace from here
            taken = len(chunk)
            try:
                while True:
                    # The head is popped once delivered: while it is in the chunk, it is
                    # this worker's (Router._unmerge takes only what follows it).
                    try:
                        entry = chunk[0]
                    except IndexError:
                        break
                    if entry.__class__ is not tuple:
                        popleft()
                        batch = observer.commit(batch, strand)  # exact counts once a flush returns
                        durations, lags, hooks = batch.durations, batch.lags, batch.hooks
                        router.reached(entry, strand)
                        started = _now()
                        continue
                    hook, args, kwargs, context, emitted_at, loop = entry
                    if hook is not plan_hook or plan is None:
                        plan = plans.get(hook)
                        if plan is None:
                            plan = plans[hook] = _Plan(engine, hook)
                        plan_hook = hook
                    if plan.tracks_runs:
                        run_id = kwargs.get("run_id")
                        if plan.starts:
                            stops.remember_parent(run_id, kwargs)
                    if breaker.state != "closed":
                        if breaker.state == "open" and not plan.tracks_runs and breaker.resting():
                            # Skipped without the observer's lock: counted with the batch.
                            popleft()
                            batch.skipped[hook] = batch.skipped.get(hook, 0) + 1
                            continue
                        if not observer.admit(hook, kwargs.get("run_id"), batch):
                            popleft()
                            continue
                    strand.busy_since, strand.inflight = started, hook
                    failed = False
                    try:
                        result = context.run(plan.call, *args, **kwargs)
                        if result is not None and isinstance(result, Awaitable):
                            context.run(engine.await_elsewhere, result, loop)
                    except StopStream as stop:
                        stops.mark(hook, kwargs.get("run_id"), stop)
                    except BaseException as exc:  # a worker must survive whatever a handler does
                        failed = True
                        error_name = observer.failure(
                            hook, exc, kwargs.get("run_id"), args, kwargs, context
                        )
                    popleft()
                    strand.busy_since = strand.inflight = None  # settled: no longer pending
                    ended = _now()
                    durations.append(ended - started)
                    lags.append(started - emitted_at)
                    hooks.append(hook)
                    if failed:
                        key = (hook, error_name)
                        batch.failures[key] = batch.failures.get(key, 0) + 1
                        if engine.wanted_mode is not None and engine.wanted_mode[2]:
                            # A thread-bound failure: what is queued is for the caller's thread.
                            self.parked = True
                            return delivered + taken - len(chunk)
                    elif breaker.consecutive:
                        observer.outcome(True)
                    if plan.tracks_runs:
                        if plan.ends:
                            stops.run_ended(run_id)
                        if not failed and plan.paired:
                            observer.track_run(hook, run_id)
                    started = ended
            finally:
                strand.busy_since, strand.inflight = None, None
                strand.stuck_reported = False
                if len(hooks) >= COMMIT_AT:
                    observer.commit(batch, strand)  # else later: stats count it where it is
            delivered += taken
            if self.parked:
                return delivered
            # Most chunks need no more than this: the last call was quick, and (a chunk of
            # many runs mixes quick hooks with slow ones) the chunk's pace was too.
            if (
                durations
                and (durations[-1] >= SLOW or started - strand.claimed_at >= SLOW * taken / 2)
                and is_slow(durations, taken)
            ):
                router.slow_seen = _now()
                if waiting:
                    # The strands claimed behind this one go to other workers now,
                    # rather than wait for this worker one after another.
                    self.hand_back(waiting)
                    pool().spread(self)


def is_slow(durations: list[float], taken: int) -> bool:
    """Whether a chunk's handler calls were slow (SLOW or more each), judged so that the
    GIL taken away once (a few ms, any time) does not pass for a slow handler: of a few
    calls every one must have been slow, of many (several runs' hooks, quick ones among
    them) at least half, and a single call must have been STALLED."""
    recent = durations[-taken:] if taken else []
    if len(recent) >= MIXED:
        return sum(1 for took in recent if took >= SLOW) * 2 >= len(recent)
    if len(recent) >= 2:
        return min(recent) >= SLOW
    return bool(recent) and recent[0] >= STALLED


class _Plan:
    """What delivering one hook needs, looked up once per drain rather than per event."""

    __slots__ = ("call", "ends", "paired", "starts", "tracks_runs")

    def __init__(self, engine: Any, hook: str) -> None:
        self.call: Callable[..., Any] = engine.sync_call(hook)
        self.starts = hook in START_HOOKS
        self.ends = hook in END_HOOKS
        self.paired = hook in PAIRED_HOOKS
        self.tracks_runs = self.starts or self.ends or self.paired


# --- the shared worker pool ---------------------------------------------------


def _idle_exit_seconds() -> float:
    try:
        return max(float(os.environ.get(IDLE_EXIT_ENV, "5")), 0.01)
    except ValueError:
        return 5.0


class Pool:
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
        self.ready: deque[ThreadLane] = deque()
        self.lingering: dict[ThreadLane, float] = {}
        self.busy: set[ThreadLane] = set()
        self.threads: set[threading.Thread] = set()
        self.watchdog: threading.Thread | None = None
        self.idle = 0
        self.polling = False  # an idle worker polls the lingering lanes (the watchdog need not)
        self.starting = 0  # workers started that have not looked for work yet
        self.idle_exit = _idle_exit_seconds()
        self._serial = 0

    def kick(self, lane: ThreadLane) -> None:
        """Emitter side: a lane went from idle to busy. Never starts a worker here:
        an idle worker is woken, or the watchdog starts one (off the token path)."""
        with self.lock:
            if lane.scheduled:
                return
            # Ctrl-C lands between two calls: what may be cut off comes first, and the
            # lane is marked scheduled and made ready with no call in between.
            self._ensure_watchdog()
            lane.ready_at = _now()
            lane.scheduled = True
            lane.slots += 1
            self.ready.append(lane)
            if self.idle:
                self.cond.notify()  # cut off: the watchdog notifies at its next poll

    def wake(self, lane: ThreadLane) -> None:
        """A lingering lane with a backlog: ready now, not at the next poll."""
        with self.lock:
            if lane in self.lingering:
                # No call between leaving the lingering set and joining the ready queue.
                lane.ready_at = _now()
                del self.lingering[lane]
                lane.slots += 1
                self.ready.append(lane)
                if self.idle:
                    self.cond.notify()

    def spread(self, lane: ThreadLane) -> None:
        """A worker found more runnable strands: more workers, up to the lane's limit."""
        with self.lock:
            want = min(lane.limit(), lane.holders + len(lane.router.runnable))
            while lane.holders + lane.slots < want:
                self._make_ready(lane, _now())
            if self.ready and not self.idle and self.watchdog is not None:
                self.watch.notify()  # it adds a worker if none frees up within SPAWN_DELAY

    def claim(self, lane: ThreadLane, claimer: object) -> bool:
        """Emitter side: take a parked lane over (False if it was already let go).

        Notes ``claimer`` in the lane under the lock: ``release`` gives the lane back
        only to its claimer, so a caller can release in a ``finally`` that Ctrl-C may
        reach before or after the claim took effect.
        """
        with self.lock:
            if not lane.parked or lane.holders or lane.taken is not None:
                return False
            self.lingering.pop(lane, None)
            lane.taken = claimer
            return True

    def release(self, lane: ThreadLane, claimer: object) -> None:
        """A lane taken over is the pool's again (nothing happens unless ``claimer`` took it)."""
        with self.lock:
            if lane.taken is not claimer:
                return
            lane.parked = False
            if lane.holds_work():
                self._make_ready(lane, _now())
            else:
                self.lingering[lane] = _now()
            lane.taken = None  # last: whatever cuts this off, the lane is with the pool
            self._ensure_watchdog()

    def forget(self, lane: ThreadLane) -> None:
        """Stop watching a closed handler's lane, so it needs no polling."""
        with self.lock:
            if self.lingering.pop(lane, None) is not None:
                lane.scheduled = False

    def _make_ready(self, lane: ThreadLane, now: float, notify: bool = True) -> None:
        lane.ready_at = now
        lane.slots += 1
        self.ready.append(lane)
        if notify and self.idle:
            self.cond.notify()

    def _poll_lingering(self, now: float, notify: bool = True) -> None:
        """Lingering lanes with new events become ready (``notify``: wake an idle worker
        for them; a polling worker takes them itself); quiet ones go idle."""
        for lane, since in list(self.lingering.items()):
            if lane.parked:
                if now - since < lane.engine.options.stall_threshold:
                    continue  # its emitter takes it over at its next event
                lane.parked = False  # nobody came: delivered here after all
                lane.engine.adapt.trial_abandoned()
            if lane.holds_work():
                del self.lingering[lane]
                self._make_ready(lane, now, notify)
            elif now - since >= LINGER_SECONDS:
                del self.lingering[lane]
                lane.scheduled = False
                if lane.queue:  # an event slipped in before the flag dropped
                    lane.scheduled = True
                    self._make_ready(lane, now, notify)

    def _spawn(self) -> None:
        if len(self.threads) >= MAX_WORKERS:
            return
        self.starting += 1
        self._serial += 1
        thread = threading.Thread(
            target=self._work, name=f"safecallbacks-worker-{self._serial}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown (3.12+): the workers there are must do
            self.starting -= 1
            return
        self.threads.add(thread)

    def _ensure_watchdog(self) -> None:
        if self.watchdog is None:
            watchdog = threading.Thread(
                target=self._watch, name="safecallbacks-watchdog", daemon=True
            )
            try:
                watchdog.start()
            except RuntimeError:  # interpreter shutdown (3.12+): no new thread; the exit
                return  # drain waits out its budget and counts what is left
            self.watchdog = watchdog
        else:
            self.watch.notify()

    # --- workers ----------------------------------------------------------------

    def _work(self) -> None:
        mark_delivery_thread()
        with self.lock:
            self.starting -= 1
        while True:
            lane = self._next_lane()
            if lane is None:
                return
            try:
                lane.drain(BATCH)
            except BaseException as exc:  # our own bug: never let it kill the pool
                lane.engine.observer.announce_once(
                    "internal", "internal_error", error_type=type(exc).__qualname__
                )
            finally:
                self._after_drain(lane)

    def _next_lane(self) -> ThreadLane | None:
        """The next ready lane; while none is, one idle worker polls the lingering ones.

        Polling from an idle worker rather than the watchdog saves a thread switch per
        poll: the worker that finds new events delivers them itself.
        """
        with self.lock:
            idle_since = _now()
            while not self.ready:
                if self.lingering and not self.polling:
                    self._poll_as_worker()
                    idle_since = _now()
                    continue
                self.idle += 1
                self.cond.wait(self.idle_exit)
                self.idle -= 1
                if not self.ready and _now() - idle_since >= self.idle_exit:
                    self.threads.discard(threading.current_thread())
                    return None
            lane = self.ready.popleft()
            lane.slots -= 1
            lane.holders += 1
            self.busy.add(lane)
            if self.ready or (self.lingering and not self.polling):
                self._call_for_help()
            return lane

    def _poll_as_worker(self) -> None:
        self.polling = True
        self.idle += 1
        try:
            self.cond.wait(POLL_SECONDS)
        finally:
            self.idle -= 1
            self.polling = False
        self._poll_lingering(_now(), notify=False)

    def _call_for_help(self) -> None:
        """More lanes are ready (a polling worker found them, notifying nobody), or the
        lingering ones are left without a polling worker: another idle worker sees to
        them, else the watchdog (which starts a worker if they wait)."""
        if self.idle:
            self.cond.notify()
        elif self.watchdog is not None:
            self.watch.notify()

    def _after_drain(self, lane: ThreadLane) -> None:
        with self.lock:
            lane.holders -= 1
            if not lane.holders:
                self.busy.discard(lane)
                if lane.slots:
                    pass  # a worker is on its way
                elif lane.holds_work() and not lane.parked:  # a parked lane waits for its emitter
                    self._make_ready(lane, _now())
                else:
                    self.lingering[lane] = _now()
            if self.watchdog is None:
                self._ensure_watchdog()
            elif lane.router.slow():
                self.watch.notify()  # to poll at once at the pace slow deliveries need
            # Else the lingering lane is polled by this worker, idle next (_next_lane).

    # --- the watchdog -----------------------------------------------------------

    def _watch(self) -> None:
        with self.lock:
            quiet_since = _now()
            while True:
                now = _now()
                self._poll(now)
                self._write_logs()
                if self.lingering or self.ready or self.busy or self.threads or _still_needed():
                    quiet_since = now
                elif now - quiet_since >= self.idle_exit * WATCHDOG_OUTLIVES:
                    # It outlives the workers and every handler that may need one, so
                    # a stream after a quiet spell has its worker started here, never
                    # on the emitting thread.
                    self.watchdog = None
                    return
                self.watch.wait(self._next_poll())

    def _next_poll(self) -> float:
        """Soon while lanes wait; every SLOW_POLL while slow deliveries run (events of other
        runs arriving meanwhile need another worker); else only to look for hung ones."""
        if self.ready or (self.lingering and not self.polling):
            return POLL_SECONDS
        if any(lane.router.slow() for lane in self.busy):
            return SLOW_POLL
        if self.busy or self.lingering:
            # A delivery may be stuck behind which other runs wait (a lingering lane
            # becomes busy without a word to the watchdog: a polling worker takes it).
            return BUSY_POLL
        return WATCHDOG_SECONDS

    def _write_logs(self) -> None:
        """Write lines emitters queued (a drop, an event after close), pool lock released."""
        if not WAITING_TO_LOG:
            return
        self.lock.release()
        try:
            write_waiting_logs()
        finally:
            self.lock.acquire()

    def _poll(self, now: float) -> None:
        """Move lingering lanes with new events to ready; let quiet ones go idle; look
        for stuck and slow deliveries; start a worker if ready lanes wait for one."""
        self._poll_lingering(now)
        for lane in self.busy:
            if lane.router.stalled(now):
                lane.take_back()
                lane.router.unmerge_if_slow()  # the other runs need not wait for it
            if (
                lane.router.runnable
                and lane.router.slow()
                and lane.holders + lane.slots < lane.limit()
                and not lane.parked
            ):
                self._make_ready(lane, now)  # strands waiting while its workers are busy
            # Its workers are inside long deliveries: another one routes what came since,
            # so the events of other runs do not wait behind them.
            if (
                lane.queue
                and now - lane.router.pumped_at > 2 * POLL_SECONDS
                and lane.holders + lane.slots < lane.limit()
                and not lane.parked
            ):
                self._make_ready(lane, now)
        if self.ready and self.idle:
            self.cond.notify()  # an emitter interrupted (Ctrl-C) before it notified
        waited = now - self.ready[0].ready_at if self.ready else 0.0
        if (
            self.ready
            and not self.idle
            and not self.starting
            and (waited >= SPAWN_DELAY or not self.threads)
        ):
            self._spawn()  # every worker is busy, maybe hung: add one
        for lane in self.busy:
            timeout = lane.engine.options.timeout
            for strand in lane.router.busy_strands():
                began = strand.busy_since
                if began is not None and now - began > timeout and not strand.stuck_reported:
                    strand.stuck_reported = True
                    lane.engine.observer.announce_once(
                        "stuck",
                        "handler_stuck",
                        hook=strand.inflight,
                        seconds=round(now - began, 3),
                    )


_POOL: Pool | None = None
_POOL_LOCK = fork_safe(threading.Lock())


def pool() -> Pool:
    global _POOL
    found = _POOL
    if found is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = Pool()
            found = _POOL
    return found


def worker_threads() -> int:
    """Live worker threads of the pool (for tests and diagnostics)."""
    found = _POOL
    return 0 if found is None else len(found.threads)


_KEEP_WATCHING: list[Callable[[], bool]] = []


def keep_watching_while(predicate: Callable[[], bool]) -> None:
    """Keep the watchdog (which starts workers) alive while ``predicate()`` is true."""
    _KEEP_WATCHING.append(predicate)


def _still_needed() -> bool:
    return any(predicate() for predicate in _KEEP_WATCHING)


def forget(lane: ThreadLane) -> None:
    """A closed handler's lane needs no more polling (no pool is made for it)."""
    if _POOL is not None:
        _POOL.forget(lane)


def _reset_after_fork() -> None:
    """The child starts with no workers: the parent's threads do not exist in it."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
