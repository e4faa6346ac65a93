"""Which of a handler's events may be delivered side by side: runs, strands and gates.

Bare, LangChain calls a shared handler from each request's thread or task:
side by side across requests, in order within each. A lane's events are
routed, in the order they were emitted, to *strands*, one per emitter (a
thread, or a task on a loop): what one emitter calls bare it calls one at a
time. The events of a run, and of every run under it, follow the strand of
its root, whichever thread emits them. Strands are delivered side by side, at
most ``max_concurrency`` at once, but runs that did not overlap when emitted
never are: a new root run waits (a ``Gate``) until every root run that ended
before it started has been delivered. While deliveries are quick one consumer
keeps up with everything: then the root runs of every emitter share one strand,
delivered in the lane's own order with no work per run or per strand; once a
delivery is slow, that strand is split run by run (``Router._unmerge``) and
strands are spread over several consumers. An event of a run
the lane never saw start (a hook called by hand, a handler attached mid-run) is a *fence*:
delivered alone, after everything before it and before anything after it.

Nothing here runs on the token path: routing happens when a consumer claims
work, or on an emitter's slow path once the queue is full. ``Router.lock`` is
never held while a handler runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from contextvars import ContextVar
from itertools import repeat
from operator import call as _call
from typing import Any

from ._compat import get_running_loop
from ._hooks import END_HOOKS, START_HOOKS
from ._observe import Batch

_now = time.monotonic
_get_ident = threading.get_ident
_current_task = asyncio.current_task
RUN_BOUNDARIES = START_HOOKS | END_HOOKS
"""Hooks kept while any other event can be shed instead (a run's start, end or error)."""
TAKE_MIN = 4  # entries a consumer claims from a strand at once, at least
TAKE_START = 16
TAKE_MAX = 256  # and at most: chunks grow while their deliveries take under QUICK each
QUICK = 0.0002  # seconds per delivery under which chunks grow
SLOW = 0.001  # seconds per delivery from which strands are spread over several consumers
STALLED = 0.01  # a delivery in flight this long is slow too
CALM = 1.0  # seconds without a slow delivery before one consumer is enough again
RECENT_ENDS = 4096  # root ends remembered for the settle barrier that follows each
FENCE = object()  # the strand key of events whose run is unknown
FORGET_AT = 256  # ended runs of the shared strand kept before looking which can go
CURRENT_SCOPE: ContextVar[Any] = ContextVar("safecallbacks_scope", default=None)
"""The request scope (``_scope.Scope``) the caller is in: read when a run starts."""


class Gate:
    """Placed before a new root run's events: open once ``after`` earlier root runs are done.

    ``waits``: only those of them (the others belong to requests in progress side by side).
    """

    __slots__ = ("after", "behind", "trace", "waits")

    def __init__(
        self,
        after: int,
        waits: frozenset[int] | None = None,
        trace: _Trace | None = None,
        behind: Strand | None = None,
    ) -> None:
        self.after = after
        self.waits = waits
        self.trace = trace  # the root run it stands before (to move it with that run)
        self.behind = behind  # or: open once this strand holds nothing (see Router._unmerge)


class TraceEnd:
    """Placed after a root run's end: delivering it marks that run done (opening gates)."""

    __slots__ = ("index", "trace")

    def __init__(self, index: int, trace: _Trace | None = None) -> None:
        self.index = index
        self.trace = trace


class Part:
    """One strand's share of a flush or settle barrier."""

    __slots__ = ("whole",)

    def __init__(self, whole: Any) -> None:
        self.whole = whole


class RunMark:
    """A run's start (with who emitted it) or end, for routing only: never delivered.

    Put before every start event, and in place of the starts and ends a handler
    does not implement, so that routing knows each run's root and emitter.
    ``shed``: the start was dropped for lack of room; the whole run goes with it.
    """

    __slots__ = ("ends", "key", "parent_run_id", "run_id", "scope", "shed")

    def __init__(
        self, run_id: Any, parent_run_id: Any, key: object, ends: bool, scope: Any = None
    ) -> None:
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.key = key
        self.ends = ends
        self.scope = scope  # the request scope the run was started in (``_scope``)
        self.shed = False


class _Trace:
    """A root run and every run under it: the strand they follow."""

    __slots__ = ("after", "key", "root", "scope", "shed", "strand")

    def __init__(
        self, root: Any, strand: Strand | None, scope: Any = None, key: object = None
    ) -> None:
        self.root = root
        self.strand = strand
        self.scope = scope
        self.shed = strand is None
        self.key = key  # its emitter: the strand it gets when a merged strand is split
        # Started on the shared strand behind root runs that had ended: the gate it
        # needs (``Gate(after)``) if it moves to a strand of its own before they are done.
        self.after = 0


class Strand:
    """The events of one emitter, in emission order; delivered by one consumer at a time."""

    __slots__ = (
        "batch",
        "busy",
        "busy_since",
        "chunk",
        "claimed_at",
        "controls",
        "dropped",
        "entries",
        "inflight",
        "key",
        "marks",
        "merged_out",
        "queued",
        "routed",
        "scope",
        "settle_gave_up",
        "stuck_reported",
        "take",
        "taken",
        "traces",
    )

    def __init__(self, key: object, scope: Any = None) -> None:
        self.key = key
        self.scope = scope  # a request scope's runs go to strands of their own
        # A scope's events routed here and dropped from here, per hook (scoped strands only).
        self.routed: dict[str, int] | None = None if scope is None else {}
        self.dropped: dict[str, int] | None = None if scope is None else {}
        self.entries: deque[Any] = deque()  # routed, not claimed (only under Router.lock)
        self.chunk: deque[Any] = deque()  # claimed, being delivered (only by its consumer)
        self.busy = False
        self.queued = False  # in Router.runnable
        self.traces = 0  # live root runs routed here
        self.taken = 0  # events in the chunk when it was claimed
        self.controls = 0  # barrier parts and run ends in the chunk, not yet reached
        self.marks = 0  # gates, barrier parts and run ends in ``entries``
        self.take = TAKE_START  # entries claimed at once: more while deliveries are quick
        self.busy_since: float | None = None
        self.claimed_at = 0.0  # when its consumer claimed its chunk, or began delivering it
        self.inflight: str | None = None
        self.batch = Batch()  # results not yet committed to the observer
        self.stuck_reported = False
        # The busy_since of a delivery a root run's end already waited for in vain: the
        # same hung delivery never costs a second wait.
        self.settle_gave_up: float | None = None
        self.merged_out = False  # a shared strand whose runs moved out (Router._unmerge)

    def active(self) -> bool:
        return self.busy or bool(self.entries)


def emitter_key(async_only: bool, bare_run_inline: bool) -> object:
    """Who is emitting: the unit bare LangChain calls a handler from, one call at a time.

    On an event loop that is the task, for async handlers (awaited in it) and for
    sync handlers LangChain hops to an executor thread per event; a sync handler
    with ``run_inline`` is called on the loop's thread for every task. Elsewhere,
    the thread.
    """
    if get_running_loop() is not None and (async_only or not bare_run_inline):
        task = _current_task()
        if task is not None:
            return id(task)
    return _get_ident()


class Router:
    """Routes one lane's queue to strands and hands runnable strands to its consumers."""

    def __init__(self, lane: Any, serial: bool) -> None:
        self.lane = lane
        self.serial = serial  # max_concurrency=1: one strand, the lane's exact order
        self.slow_seen = -CALM  # when a delivery last took SLOW or more
        self.lock = threading.Lock()
        self.strands: dict[object, Strand] = {}
        self.runs: dict[Any, _Trace] = {}
        self.runnable: deque[Strand] = deque()
        self.gated: list[Strand] = []
        self.recent_ends: dict[Any, Strand | None] = {}
        self.end_scopes: dict[int, Any] = {}  # scope of each ended root not yet done
        self.scoped = False  # some root run was started in a scope
        self.ends_routed = 0
        self.done_mark = 0
        self.done_early: set[int] = set()
        self.held = 0  # events in strands' entries
        self.claimed: set[Strand] = set()  # strands being delivered
        self.claimed_events = 0  # events in their chunks when claimed
        self.fenced = False  # the fence strand holds or delivers something
        self.pumped_at = 0.0
        # While deliveries are quick, the unscoped root runs of every emitter share one
        # strand (the lane's own order, one consumer, no work per run); split by emitter
        # when deliveries turn slow (``_unmerge``). Thread lanes only.
        self.merges = lane.merges and not serial
        self.merge_key: object | None = None  # the shared strand's key while merging
        self.merged_ends: set[int] = set()  # root ends routed to it, not yet done
        self.merged_gone: dict[Any, _Trace] = {}  # runs ended there whose events it may hold

    # --- what the lane and its consumers ask ---------------------------------------

    def backlog(self) -> int:
        """Events routed and not yet delivered (read without the lock)."""
        if not self.claimed:
            return self.held
        claimed = list(self.claimed)
        chunks = sum(len(s.chunk) - s.controls for s in claimed)
        if self.lane.pops_after:  # the event in delivery is still its chunk's head
            chunks -= sum(1 for s in claimed if s.inflight is not None)
        return self.held + chunks

    def routed(self) -> int:
        """``backlog`` or a little more (chunks count in full until released): O(1)."""
        return self.held + self.claimed_events

    def busy_strands(self) -> list[Strand]:
        return list(self.claimed)

    def batches(self) -> list[Batch]:
        return [strand.batch for strand in list(self.strands.values())]

    def idle(self) -> bool:
        return not self.strands or not any(s.active() for s in list(self.strands.values()))

    def claim(
        self,
        limit: int,
        done: list[Strand] | None = None,
        seconds: float = 0.0,
        many: int = 1,
        alone: bool = False,
        judge: bool = True,
    ) -> list[Strand]:
        """Up to ``many`` runnable strands, some of each one's entries moved to its chunk.

        ``done``: the strands the caller delivered before (in ``seconds``), released
        first under the same lock. A chunk is what its consumer delivers before
        routing again and what shedding cannot reach: it grows while deliveries are
        quick and shrinks when they are not.
        """
        slow = False
        if done:
            each = seconds / len(done)
            for strand in done:
                slow = _resize(strand, each) or slow
            slow = slow and judge  # else the caller judged from the calls themselves
        claimed: list[Strand] = []
        with self.lock:
            if done:
                self._release_all(done)
                if slow:
                    self.slow_seen = _now()
            if self.merge_key is not None and self.slow():
                self._unmerge()
            self.pump()
            now = self.pumped_at
            # Many strands for one consumer in turn (quick deliveries) count as one.
            room = many if many > 1 else limit - len(self.claimed)
            if alone:  # a worker thread delivering slow strands: one at a time, others spread
                room = min(room, 1)
            runnable, claimed_set = self.runnable, self.claimed
            while runnable and len(claimed) < room:
                strand = runnable.popleft()
                strand.queued = False
                if strand.busy:
                    continue
                entries = strand.entries
                if not strand.marks and 0 < len(entries) <= strand.take:
                    # The common case of _take, inlined (it is per strand, and while
                    # deliveries are quick a strand holds an event or two): only events,
                    # all of them; the deques change places, nothing is moved.
                    strand.entries, strand.chunk = strand.chunk, entries
                    events = len(entries)
                    self.held -= events
                    self.claimed_events += events
                    strand.taken = events
                    strand.controls = 0
                elif not self._take(strand, strand.take):
                    continue
                strand.busy = True
                strand.claimed_at = now
                claimed_set.add(strand)
                claimed.append(strand)
        return claimed

    def _release_all(self, done: list[Strand]) -> None:
        """``_release`` for each strand of ``done``, the common case inlined (per strand)."""
        claimed = self.claimed
        for strand in done:
            if strand.chunk:  # left undelivered (a parked lane)
                self._release(strand)
                continue
            strand.busy = False
            claimed.discard(strand)
            self.claimed_events -= strand.taken
            strand.controls = 0
            if strand.key is self.merge_key and self.merged_gone:
                self._forget_delivered(strand)
            if strand.entries:
                self._schedule(strand)
            else:
                self._after(strand)

    def release(
        self, strand: Strand, seconds: float = 0.0, resize: bool = True, judge: bool = True
    ) -> None:
        """A consumer is done with ``strand``'s chunk (after ``seconds``; ``resize``: the
        chunk was delivered, so its time tells how big the next one should be; ``judge``:
        that time also says whether deliveries are slow)."""
        slow = _resize(strand, seconds) and judge if resize else False
        with self.lock:
            self._release(strand)
            if slow:
                self.slow_seen = _now()

    def slow(self) -> bool:
        """Whether a delivery took SLOW or more lately: then strands go to several consumers."""
        return _now() - self.slow_seen < CALM

    def unmerge_if_slow(self) -> None:
        """Watchdog: split the shared strand once a delivery of it is found slow."""
        if self.merge_key is not None and self.slow():
            with self.lock:
                if self.merge_key is not None:
                    self._unmerge()

    def stalled(self, now: float) -> bool:
        """Watchdog: True when a delivery has been in flight for STALLED (slow too), or a
        chunk has been delivered at STALLED or more per event so far.

        The chunk's pace catches deliveries as long as the watchdog's period, which a
        poll in step with them would always find just started.
        """
        for strand in list(self.claimed):
            since = strand.busy_since
            if since is None:
                continue
            spent = now - strand.claimed_at
            done = strand.taken - len(strand.chunk)
            if now - since > STALLED or (done >= 1 and spent >= STALLED * (done + 1)):
                self.slow_seen = now
                return True
        return False

    def _release(self, strand: Strand) -> None:
        strand.busy = False
        self.claimed.discard(strand)
        self.claimed_events -= strand.taken
        if strand.chunk:  # left undelivered (a parked lane): back in front, in order
            back = sum(1 for e in strand.chunk if e.__class__ is tuple)
            self.held += back
            strand.marks += len(strand.chunk) - back
            strand.entries.extendleft(reversed(strand.chunk))
            strand.chunk.clear()
        strand.controls = 0
        self._after(strand)

    def scope_of(self, item: Any, on_emitter: bool = True) -> Any:
        """The scope of an event dropped before routing: its run's, else (on the
        emitting thread) the emitter's."""
        trace = self.runs.get(item[2].get("run_id"))
        if trace is not None:
            return trace.scope
        return CURRENT_SCOPE.get() if on_emitter else None

    def reached(self, entry: Any, strand: Strand | None = None) -> None:
        """A barrier's part or a root run's end reached the head of its strand."""
        if strand is not None:
            strand.controls -= 1
        if entry.__class__ is Part:
            entry.whole.release_part()
        elif entry.__class__ is TraceEnd:
            with self.lock:
                self._done(entry.index)

    # --- routing (Router.lock held) -------------------------------------------------

    def pump(self) -> None:
        """Route what the lane's queue holds, in order, until something must wait.

        Per event, this is the worker's share of the token path, so the common case is
        inlined: an event of a known run that neither ends it nor meets a fence goes
        straight to its run's strand. Runs, starts, ends, fences and barriers take
        ``_route``.
        """
        lane = self.lane
        queue = lane.queue
        popleft = queue.popleft
        route = self._route
        runs = self.runs
        ends = END_HOOKS
        held = 0
        # The run of the event before, by identity: a run's events carry one UUID object,
        # and hashing it is a Python call. Forgotten whenever _route may change a run.
        last_run: object = None
        last_strand: Strand | None = None
        while True:
            try:
                entry = popleft()  # only ever under this lock: put back if it must wait
            except IndexError:
                break
            if entry.__class__ is tuple and entry[0] not in ends and not self.fenced:
                run_id = entry[2].get("run_id")
                if run_id is last_run and run_id is not None:
                    strand = last_strand
                else:
                    trace = runs.get(run_id) if run_id is not None else None
                    strand = trace.strand if trace is not None else None
                    last_run, last_strand = run_id, strand
                if strand is not None:
                    strand.entries.append(entry)
                    held += 1
                    routed = strand.routed
                    if routed is not None:
                        routed[entry[0]] = routed.get(entry[0], 0) + 1
                    if not strand.busy and not strand.queued:
                        self._schedule(strand)
                    continue
            last_run = last_strand = None
            if not route(entry):
                queue.appendleft(entry)
                break
            if entry.__class__ is not tuple:
                lane.control_left()
        self.held += held
        self.pumped_at = _now()
        lane.room_changed(self.routed())

    def _route(self, entry: Any) -> bool:
        kind = entry.__class__
        if kind is tuple:
            run_id = entry[2].get("run_id")
            trace = self.runs.get(run_id) if run_id is not None else None
            if trace is None:
                return self._fence(entry)
            if self.fenced:
                return False
            strand = trace.strand
            if strand is None:  # its start was shed: so is everything of it
                self.lane.engine.observer.dropped(entry[0], reason="queue_full")
                if trace.scope is not None:
                    trace.scope.dropped_unrouted(entry[0])
            else:
                self._append(strand, entry)
                self.held += 1
                routed = strand.routed
                if routed is not None:
                    routed[entry[0]] = routed.get(entry[0], 0) + 1
            if entry[0] in END_HOOKS:
                self._run_ended(run_id, trace)
            return True
        if kind is RunMark:
            if self.fenced:
                return False
            if entry.ends:
                trace = self.runs.get(entry.run_id)
                if trace is not None:
                    self._run_ended(entry.run_id, trace)
            else:
                self._run_started(entry)
            return True
        self._barrier(entry)
        return True

    def _strand(self, key: object, scope: Any = None) -> Strand:
        if scope is not None:
            key = (key, scope)
        strand = self.strands.get(key)
        if strand is None:
            strand = self.strands[key] = Strand(key, scope)
            if scope is not None:
                scope.attach(strand)
        return strand

    def _run_started(self, mark: RunMark) -> None:
        parent = mark.parent_run_id
        trace = self.runs.get(parent) if parent is not None else None
        if trace is not None:
            if mark.shed and trace.strand is not None:
                trace = _Trace(None, None, trace.scope)  # a child run shed: only its subtree
            self.runs[mark.run_id] = trace
            return
        scope = mark.scope
        if mark.shed:
            self.runs[mark.run_id] = _Trace(mark.run_id, None, scope)
            return
        if scope is not None:
            self.scoped = True
        key = FENCE if self.serial else mark.key
        merged = False
        if self.merges and scope is None:
            if self.merge_key is None and not self.slow():
                self.merge_key = object()  # calm again: new runs share one strand
            if self.merge_key is not None and not self._emitter_busy(mark.key):
                key, merged = self.merge_key, True
        strand = self._strand(key, scope)
        strand.traces += 1
        trace = _Trace(mark.run_id, strand, scope, mark.key)
        if (not self.serial or self.scoped) and self.done_mark < self.ends_routed:
            if merged and self._ends_pending() == len(self.merged_ends):
                # They are all ahead of it on the shared strand, delivered in order.
                trace.after = self.ends_routed
            else:
                gate = self._gate(scope)
                if gate is not None:
                    gate.trace = trace
                    self._append(strand, gate)
        self.runs[mark.run_id] = trace

    def _forget_delivered(self, merged: Strand) -> None:
        """Ended runs of the shared strand with nothing left in it need not be kept;
        looked for only once they outnumber its entries (amortised, at most O(1) each)."""
        entries = merged.entries
        if not entries:
            self.merged_gone.clear()
            return
        if len(self.merged_gone) <= FORGET_AT + 2 * len(entries):
            return
        left = {entry[2].get("run_id") for entry in entries if entry.__class__ is tuple}
        self.merged_gone = {run: t for run, t in self.merged_gone.items() if run in left}

    def _emitter_busy(self, key: object) -> bool:
        """Whether the emitter has runs on a strand of its own (from before a merge): its
        new ones join them there, so that what it emits stays one at a time, in order."""
        own = self.strands.get(key)
        return own is not None and (own.traces > 0 or own.active())

    def _ends_pending(self) -> int:
        """Root runs ended whose ends have not been delivered yet."""
        return self.ends_routed - self.done_mark - len(self.done_early)

    def _unmerge(self) -> None:
        """Deliveries turned slow: the runs sharing one strand get their emitters' strands.

        What the shared strand holds moves in order to the strands of the runs it
        belongs to, ended runs' events, ends and gates included; a barrier's part
        becomes a part in every strand that received something before it. The head of
        a chunk being delivered stays (``ThreadLane._deliver`` pops an event only once
        it is delivered): its run's strand waits until the shared strand holds nothing.
        """
        key, self.merge_key = self.merge_key, None
        self.merged_ends.clear()
        gone, self.merged_gone = self.merged_gone, {}
        merged = self.strands.get(key)
        if merged is None:
            return
        merged.merged_out = True
        merged.traces = 0
        self._move_traces(merged, gone)
        head, moving = self._empty(merged)
        placed: dict[int, Strand] = {}  # where moved entries went, in order of first use
        begun: set[int] = set()  # traces past the ends they started behind
        if head is not None:
            placed[id(merged)] = merged  # a barrier part after the head waits for it there
            if head.__class__ is tuple:
                trace = self._trace_of(head, gone)
                if trace is not None and trace.strand is not None:
                    begun.add(id(trace))
                    self._append(trace.strand, Gate(0, behind=merged))
        for entry in moving:
            kind = entry.__class__
            if kind is Part:
                self._split_part(entry, list(placed.values()))
                continue
            trace = self._trace_of(entry, gone) if kind is tuple else entry.trace
            if trace is None or trace.strand is None:
                self._append(merged, entry)  # not expected: kept in order where it was
                placed[id(merged)] = merged
                continue
            target = trace.strand
            if id(trace) not in begun:
                begun.add(id(trace))
                if trace.after > self.done_mark:  # it no longer follows those ends in order
                    self._append(target, Gate(trace.after, trace=trace))
            self._append(target, entry)
            placed[id(target)] = target

    def _move_traces(self, merged: Strand, gone: dict[Any, _Trace]) -> None:
        for trace in {id(t): t for t in (*self.runs.values(), *gone.values())}.values():
            if trace.strand is merged:
                own = trace.strand = self._strand(trace.key)
                if self.runs.get(trace.root) is trace:
                    own.traces += 1
        for run, strand in list(self.recent_ends.items()):
            ended = gone.get(run)
            if strand is merged and ended is not None:
                self.recent_ends[run] = ended.strand

    def _empty(self, merged: Strand) -> tuple[Any, list[Any]]:
        """Take everything out of ``merged`` but the head of a chunk being delivered."""
        stolen: list[Any] = []
        head = None
        if merged.busy:
            chunk = merged.chunk
            stolen = _chunk_tail(chunk, keep=1)
            head = chunk[0] if chunk else None
            events = sum(1 for entry in stolen if entry.__class__ is tuple)
            merged.taken -= events
            merged.controls -= len(stolen) - events
            self.claimed_events -= events
            self.held += events
        stolen.extend(merged.entries)
        merged.entries.clear()
        merged.marks = 0
        return head, stolen

    def _trace_of(self, entry: Any, gone: dict[Any, _Trace]) -> _Trace | None:
        run_id = entry[2].get("run_id")
        trace = self.runs.get(run_id)
        return trace if trace is not None else gone.get(run_id)

    def _split_part(self, part: Part, targets: list[Strand]) -> None:
        """A barrier's part, split into one part in each of ``targets``."""
        if not targets:
            part.whole.release_part()
            return
        part.whole.add_parts(len(targets) - 1)
        self._append(targets[0], part)
        for strand in targets[1:]:
            self._append(strand, Part(part.whole))

    def _gate(self, scope: Any) -> Gate | None:
        """What a new root run of ``scope`` waits for: the root runs that ended before it,
        except those of other requests still in progress (bare, they run side by side)."""
        if scope is None or not self.end_scopes:
            return Gate(self.ends_routed)
        own = scope.root
        waits = frozenset(
            index
            for index in range(self.done_mark, self.ends_routed)
            if index not in self.done_early and not _side_by_side(self.end_scopes.get(index), own)
        )
        if not waits:
            return None
        return Gate(max(waits) + 1, waits)

    def _opened(self, gate: Gate) -> bool:
        behind = gate.behind
        if behind is not None:
            return not behind.active()
        if gate.after <= self.done_mark:
            return True
        waits = gate.waits
        if waits is None:
            return False
        done_mark, early = self.done_mark, self.done_early
        return all(index < done_mark or index in early for index in waits)

    def _run_ended(self, run_id: Any, trace: _Trace) -> None:
        self.runs.pop(run_id, None)
        strand = trace.strand
        merged = strand is not None and strand.key is self.merge_key
        if merged:
            self.merged_gone[run_id] = trace  # its events there may still have to move
        if run_id != trace.root:
            return
        index = self.ends_routed
        self.ends_routed += 1
        if len(self.recent_ends) >= RECENT_ENDS:
            del self.recent_ends[next(iter(self.recent_ends))]
        self.recent_ends[run_id] = strand
        if trace.scope is not None:
            self.end_scopes[index] = trace.scope
        if strand is None:
            self._done(index)
            return
        strand.traces -= 1
        if merged:
            self.merged_ends.add(index)
        self._append(strand, TraceEnd(index, trace))

    def _fence(self, entry: Any) -> bool:
        """An event of an unknown run: alone, after everything before it."""
        if any(s.active() for k, s in self.strands.items() if k is not FENCE):
            return False
        self._append(self._strand(FENCE), entry)
        self.held += 1
        self.fenced = not self.serial
        return True

    def _barrier(self, barrier: Any) -> None:
        """Into every strand holding something; a settle barrier only into its run's."""
        run = barrier.run
        scopes = barrier.scopes
        if run is not None and run in self.recent_ends:
            found = self.recent_ends.pop(run)
            targets = [found] if found is not None and found.active() else []
        elif scopes is not None:
            targets = [s for s in self.strands.values() if s.scope in scopes and s.active()]
        else:
            targets = [s for s in self.strands.values() if s.active()]
        barrier.expect(len(targets))
        for strand in targets:
            self._append(strand, Part(barrier))

    def _append(self, strand: Strand, entry: Any) -> None:
        strand.entries.append(entry)
        if entry.__class__ is not tuple:
            strand.marks += 1
        if not strand.busy and not strand.queued:
            self._schedule(strand)

    def _schedule(self, strand: Strand) -> None:
        head = strand.entries[0]
        if head.__class__ is Gate and not self._opened(head):
            if strand not in self.gated:
                self.gated.append(strand)
            return
        strand.queued = True
        self.runnable.append(strand)

    def _take(self, strand: Strand, take: int) -> bool:
        entries, chunk = strand.entries, strand.chunk
        if not strand.marks and 0 < len(entries) <= take:
            # Only events, all of them: the deques change places, nothing is moved.
            strand.entries, strand.chunk = chunk, entries
            events = len(entries)
            self.held -= events
            self.claimed_events += events
            strand.taken = events
            strand.controls = 0
            return True
        if not strand.marks and len(entries) > take:
            # Only events, more than a chunk: ``take`` of them moved without a Python loop.
            chunk.extend(map(_call, repeat(entries.popleft, take)))
            self.held -= take
            self.claimed_events += take
            strand.taken = take
            strand.controls = 0
            return True
        events = controls = 0
        while entries and len(chunk) < take:
            entry = entries[0]
            if entry.__class__ is Gate:
                if not self._opened(entry):
                    break
                entries.popleft()
                strand.marks -= 1
                continue
            chunk.append(entries.popleft())
            if entry.__class__ is tuple:
                events += 1
            else:
                controls += 1
                strand.marks -= 1
        self.held -= events
        self.claimed_events += events
        strand.taken = events
        strand.controls = controls
        if chunk:
            return True
        self._after(strand)
        return False

    def _after(self, strand: Strand) -> None:
        """``strand`` is not being delivered: schedule it, or let it go if it is done."""
        if strand.entries:
            self._schedule(strand)
        elif strand.traces == 0 and self.strands.get(strand.key) is strand:
            if strand.key is FENCE:
                self.fenced = False
            del self.strands[strand.key]
            self.lane.engine.observer.commit(strand.batch, strand)
            if strand.scope is not None:
                strand.scope.retire(strand)
            if strand.key is self.merge_key:
                self.merged_gone.clear()
            elif self.gated and strand.merged_out:
                self._reopen_gated()  # runs moved out of it waited for it (Gate.behind)

    def _done(self, index: int) -> None:
        self.end_scopes.pop(index, None)
        if self.merged_ends:
            self.merged_ends.discard(index)
        if index != self.done_mark:
            self.done_early.add(index)
            if not self.scoped:
                return  # only a gate with ``waits`` can open before ``done_mark`` moves
        else:
            self.done_mark += 1
            while self.done_mark in self.done_early:
                self.done_early.discard(self.done_mark)
                self.done_mark += 1
        self._reopen_gated()

    def _reopen_gated(self) -> None:
        for strand in list(self.gated):
            head = strand.entries[0] if strand.entries else None
            if head is None or head.__class__ is not Gate or self._opened(head):
                self.gated.remove(strand)
                if not strand.busy and not strand.queued and strand.entries:
                    strand.queued = True
                    self.runnable.append(strand)

    # --- shedding and discarding (Router.lock held) -----------------------------------

    def shed_token(self, oldest: bool) -> bool:
        """Drop one queued event that neither starts nor ends a run (oldest or newest)."""
        best: tuple[float, Strand, int] | None = None
        for strand in self.strands.values():
            found = _sheddable(strand.entries, oldest)
            if found is None:
                continue
            index, emitted_at = found
            better = best is None or (emitted_at < best[0] if oldest else emitted_at > best[0])
            if better:
                best = (emitted_at, strand, index)
        if best is None:
            return False
        _, strand, index = best
        victim = strand.entries[index]
        del strand.entries[index]
        self.held -= 1
        self.lane.engine.observer.dropped(victim[0], reason="queue_full")
        note_dropped(strand, victim[0])
        return True

    def discard_all(self, reason: str) -> Counter[str]:
        """Take every routed entry out: events are returned per hook, barriers released."""
        dropped: Counter[str] = Counter()
        for strand in list(self.strands.values()):
            # A chunk is its consumer's, but each entry is popped once, by it or here:
            # a delivery in flight finishes, what waits behind it is dropped. A thread
            # lane's consumer pops its chunk's head once delivered: that one is its.
            keep = 1 if strand.busy and self.lane.pops_after else 0
            taken = _chunk_tail(strand.chunk, keep)
            taken.extend(strand.entries)
            strand.entries.clear()
            for entry in taken:
                kind = entry.__class__
                if kind is tuple:
                    dropped[entry[0]] += 1
                    note_dropped(strand, entry[0])
                elif kind is Part:
                    entry.whole.release_part()
                elif kind is TraceEnd:
                    self._done(entry.index)
            strand.controls = strand.marks = 0
            if not strand.busy:
                self._after(strand)
        self.held = 0
        self.runnable.clear()
        for strand in self.strands.values():
            strand.queued = False
        self.gated.clear()
        return dropped

    def take_all(self) -> list[Any]:
        """Every entry not being delivered, strand by strand, then the unrouted ones."""
        taken: list[Any] = []
        for strand in list(self.strands.values()):
            if not strand.busy:
                taken.extend(strand.entries)
                routed = strand.routed
                if routed is not None:  # delivered inline now, or routed again: not counted twice
                    for entry in strand.entries:
                        if entry.__class__ is tuple:
                            routed[entry[0]] -= 1
                strand.entries.clear()
                strand.marks = 0
                self._after(strand)
        queue = self.lane.queue
        while queue:
            entry = queue.popleft()
            if entry.__class__ is not tuple:
                self.lane.control_left()
            taken.append(entry)
        self.held = 0
        self.runnable.clear()
        self.gated.clear()
        for strand in self.strands.values():
            strand.queued = False
        self.lane.room_changed(self.routed())
        return taken

    def queued_by_hook(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for strand in list(self.strands.values()):
            for entries in (strand.entries, strand.chunk):
                while True:
                    try:
                        listed = list(entries)
                        break
                    except RuntimeError:  # mutated while copying; try again
                        continue
                found.update(e[0] for e in listed if e.__class__ is tuple)
            if strand.inflight is not None and not self.lane.pops_after:
                found[strand.inflight] += 1  # popped from its chunk while in delivery
        return found


def _resize(strand: Strand, seconds: float) -> bool:
    """Grow or shrink the next chunk by how long its events took each (a pause for the
    GIL spread over a chunk barely counts); True when that was SLOW or more."""
    each = seconds / max(strand.taken, 1)
    if each < QUICK:
        strand.take = min(strand.take * 2, TAKE_MAX)
        return False
    if each >= SLOW:
        strand.take = max(strand.take // 2, TAKE_MIN)
        return True
    return False


def _sheddable(entries: deque[Any], oldest: bool) -> tuple[int, float] | None:
    """Where the oldest (or newest) event that may be shed sits in ``entries``."""
    indexes = range(len(entries)) if oldest else range(len(entries) - 1, -1, -1)
    for index in indexes:
        entry = entries[index]
        if entry.__class__ is tuple and entry[0] not in RUN_BOUNDARIES:
            return index, entry[4]
    return None


def _side_by_side(other: Any, own: Any) -> bool:
    """Whether a root run of scope ``other`` belongs to another request still in progress."""
    return other is not None and other.root is not own and other.root.open


def note_dropped(strand: Strand, hook: str, count: int = 1) -> None:
    """Count events dropped from ``strand`` towards its scope (the observer counts them too)."""
    dropped = strand.dropped
    if dropped is not None:
        dropped[hook] = dropped.get(hook, 0) + count


def _chunk_tail(chunk: deque[Any], keep: int) -> list[Any]:
    """Take out, in order, what ``chunk`` holds past its first ``keep`` entries (the
    head a thread lane's consumer is delivering stays its own: it only pops the head)."""
    tail: list[Any] = []
    while len(chunk) > keep:
        try:
            tail.append(chunk.pop())
        except IndexError:  # its consumer popped the last one meanwhile
            break
    tail.reverse()
    return tail
