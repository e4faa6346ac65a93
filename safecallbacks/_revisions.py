"""Moving a handler between inline and offload while it runs, as ``auto`` revises its choice.

The engine's side of ``_adapt``: a move waits until nothing queued could be
overtaken, or, for a lane a worker parked after thread-bound failures, the
caller's thread takes the queued events over and delivers them itself. Nothing
here runs on the token path until a move has been asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._interrupts import held_interrupts
from ._queue import Barrier, Lane, wait_settled
from ._runs import RunMark
from ._workers import pool as pool_of_lanes

if TYPE_CHECKING:
    from ._adapt import Adaptive
    from ._inline import InlineCalls
    from ._observe import Observer
    from ._options import Options
    from ._workers import ThreadLane

_now = time.monotonic
PARK_CHECK_SECONDS = 0.005  # how often a settling caller looks for a parked lane


class Revisions:
    """Mixed into the engine: the moves ``auto`` asks for, and making them safely."""

    options: Options
    closed: bool
    observer: Observer
    adapt: Adaptive
    inline: InlineCalls
    mode_reason: str
    wanted_mode: tuple[str, str, bool] | None
    awaited_hooks: frozenset[str]
    _hook_sets: tuple[frozenset[str], frozenset[str]]
    _thread_lane: ThreadLane
    _refresh_fast_lane: Callable[[], None]
    _awaited_hooks: Callable[[frozenset[str], frozenset[str]], frozenset[str]]
    lanes: Callable[[], list[Lane]]

    def request_mode(self, mode: str, reason: str, trial: bool = False) -> None:
        """Ask to move to ``mode`` once what is queued has been delivered (any thread)."""
        if self.options.mode != mode and not self.closed:
            self.wanted_mode = (mode, reason, trial)
            self._refresh_fast_lane()  # recorders now pass through record(), which moves

    def refresh(self) -> None:
        self._refresh_fast_lane()

    def _move_when_ready(self) -> None:
        """Make the move auto asked for, once nothing queued can be overtaken."""
        if self._thread_lane.parked:
            self.take_over()
        elif all(lane.idle() for lane in self.lanes()):
            wanted, self.wanted_mode = self.wanted_mode, None
            if wanted is not None:
                self.switch_mode(wanted[0], wanted[1])

    def take_over(self) -> None:
        """Deliver a parked lane's events here, on the caller's thread, then stay inline.

        A worker parks the lane when a hook failed there in a way that may be
        thread-bound; the first event delivered here is the trial.
        """
        lane = self._thread_lane
        wanted = self.wanted_mode
        if wanted is None:
            return
        pool = pool_of_lanes()
        claimer = object()  # this call's claim only: a nested or concurrent one is another
        entries: list[Any] = []
        # Ctrl-C may land anywhere from here on: the lane goes back to the pool in any
        # case, if it was claimed at all (``release`` knows), with what was not delivered.
        try:
            if not pool.claim(lane, claimer):
                return
            self.wanted_mode = None
            self.switch_mode(wanted[0], wanted[1])
            with held_interrupts(), lane.router.lock:
                entries = lane.router.take_all()
            while entries:
                entry = entries.pop(0)
                if entry.__class__ is not tuple:
                    if isinstance(entry, Barrier):
                        entry.release()
                    else:
                        lane.router.reached(entry)
                    continue
                hook, args, kwargs, context, _, _ = entry
                error = context.run(self.inline.call, hook, args, kwargs)
                if self.adapt.trial:
                    self.adapt.trial_result(hook, error)
                    if self.options.mode != "inline":
                        break  # it fails here too: the rest goes back to the workers
        finally:
            if lane.taken is claimer:
                _give_back(lane, entries)
            pool.release(lane, claimer)

    def switch_mode(self, mode: str, reason: str) -> None:
        """Deliver from now on in ``mode`` (logged once per move, shown in stats)."""
        if self.options.mode == mode:
            return
        previous = self.options.mode
        self.options = replace(self.options, mode=mode)  # type: ignore[arg-type]
        self.mode_reason = reason
        self.awaited_hooks = self._awaited_hooks(*self._hook_sets)
        if mode == "inline":
            self.adapt.now_inline(self.options.stall_threshold)
        self._refresh_fast_lane()
        self.observer.announce_once(
            f"mode:{previous}->{mode}", "mode_changed", previous=previous, mode=mode, reason=reason
        )

    def check_stall(self, hook: str, started: float) -> None:
        """After an inline call: moved off the token path if it blocked the caller too long."""
        took = _now() - started
        if took > self.adapt.stall_limit:
            self.adapt.stalled(hook, took)

    def _settle_or_take_over(self, barrier: Barrier, deadline: float) -> bool:
        """Wait in short slices: should a worker park the lane meanwhile, this caller's
        thread is where its events belong, and it delivers them itself."""
        lane = self._thread_lane
        while not wait_settled(lane, barrier, min(deadline, _now() + PARK_CHECK_SECONDS)):
            if lane.parked and self.wanted_mode is not None:
                self.take_over()
            elif _now() >= deadline:
                return False
        return True


def _give_back(lane: Lane, entries: list[Any]) -> None:
    """Entries a failed trial leaves: queued again in order, to be routed afresh."""
    back: list[Any] = []
    for entry in entries:
        if entry.__class__ is tuple or isinstance(entry, (Barrier, RunMark)):
            back.append(entry)
            if entry.__class__ is not tuple:
                lane.count_control()
        else:
            lane.router.reached(entry)  # a barrier's part, or a run's end: settled here
    lane.queue.extendleft(reversed(back))
