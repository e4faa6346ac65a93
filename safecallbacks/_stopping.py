"""``StopStream``, and carrying an offloaded stop back into the run it was raised for.

Inline, a ``StopStream`` simply propagates to the caller. Offloaded, the handler
raises it on a worker, long after the emitter moved on: the worker leaves a
*mark* on the run and its ancestors, and the emitter raises the stop at that
run's next event. Marks die with their run; a stop whose runs are all over is
counted and logged as too late. On the token path: one dict lookup, and only
while a mark exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from ._hooks import END_HOOKS, ERROR_HOOKS

MAX_MARKS = 1_000
MAX_RUNS_REMEMBERED = 10_000
_MAX_DEPTH = 64  # ancestors a stop climbs through: deeper nesting is a bug elsewhere


class StopStream(BaseException):
    """Raise from a handler to stop the run it is observing, deliberately.

    It derives from ``BaseException`` so that LangChain's own ``except
    Exception`` around handlers lets it through. In inline mode the caller of
    ``stream()``/``invoke()`` receives it at once; in offload mode it is raised
    into the same run at that run's next event.
    """

    def __init__(self, reason: str = "stopped by a callback handler") -> None:
        super().__init__(reason)
        self.reason = reason


class StopMarks:
    """The pending stops of one handler, keyed by run, with what is needed to place them.

    ``too_late(reason)`` is called when a stop can no longer reach any run;
    ``changed()`` whenever marks appear or the last one goes (the engine's fast
    path is only taken while there are none).
    """

    def __init__(self, too_late: Callable[[str], None], changed: Callable[[], None]) -> None:
        self.marks: dict[object, StopStream] = {}
        self._parents: dict[object, object] = {}
        self._ended: dict[object, None] = {}  # runs whose end had no hook to deliver
        self._too_late = too_late
        self._changed = changed

    def clear(self) -> None:
        self.marks.clear()
        self._parents.clear()
        self._ended.clear()

    # --- emitter side -------------------------------------------------------

    def check(self, hook: str, kwargs: Mapping[str, object]) -> None:
        """Raise a pending ``StopStream`` into the run this event belongs to."""
        if hook in ERROR_HOOKS:
            return
        marks = self.marks
        found = marks.get(kwargs.get("run_id")) or marks.get(kwargs.get("parent_run_id"))
        if found is None:
            return
        for run_id in [r for r, exc in list(marks.items()) if exc is found]:
            marks.pop(run_id, None)
        self._changed()
        raise StopStream(found.reason) from found

    def end_emitted(self, hook: str, kwargs: Mapping[str, object]) -> None:
        """A run ended that the handler has no end hook for.

        A pending stop for it is raised now (its last chance); otherwise the run is
        remembered as over, so a stop delivered later is known to come too late.
        """
        if self.marks:
            self.check(hook, kwargs)
        run_id = kwargs.get("run_id")
        ended = self._ended
        ended[run_id] = None
        if len(ended) > MAX_RUNS_REMEMBERED:
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                ended.pop(next(iter(ended)))
        if self.marks:
            self.run_ended(run_id)

    # --- delivery side ------------------------------------------------------

    def remember_parent(self, run_id: object, kwargs: Mapping[str, object]) -> None:
        parent = kwargs.get("parent_run_id")
        if parent is not None:
            self._parents[run_id] = parent
            if len(self._parents) > MAX_RUNS_REMEMBERED:
                self._parents.pop(next(iter(self._parents)))

    def mark(self, hook: str, run_id: object, exc: StopStream) -> None:
        """Have ``exc`` raised into ``run_id`` and its ancestors at their next event.

        A run whose end is being delivered has no next event: its ancestors are
        marked; with none left the stop came too late.
        """
        current: object = self._parents.get(run_id) if hook in END_HOOKS else run_id
        marked = False
        for _ in range(_MAX_DEPTH):
            if current is None:
                break
            if current not in self._ended:
                self.marks[current] = exc
                marked = True
            current = self._parents.get(current)
        while len(self.marks) > MAX_MARKS:
            self.marks.pop(next(iter(self.marks)))
        if marked:
            self._changed()
        else:
            self._too_late(exc.reason)

    def run_ended(self, run_id: object) -> None:
        """A run's end was delivered: its parent link and any unused mark go with it."""
        self._parents.pop(run_id, None)
        marks = self.marks
        if not marks:
            return
        exc = marks.pop(run_id, None)
        if exc is None:
            return
        if not any(other is exc for other in list(marks.values())):
            self._too_late(exc.reason)  # every run it was meant for is over
        if not marks:
            self._changed()
