"""Holding Ctrl-C back while a few bookkeeping steps must happen together.

Python runs a ``SIGINT`` handler on the main thread between two bytecodes (in
practice after a call returns or as a function starts), so ``KeyboardInterrupt``
can land between any two steps of the emitter's slow path: in the middle of
routing a lane's queue to strands, or of shedding an event. Those run under the
router's lock and change several things at once; cut off half-way they would
lose an event or leave counts that never add up again. ``held_interrupts``
defers a ``SIGINT`` that arrives meanwhile and raises it again, through the
handler that was installed, once the steps are done.

Only for slow paths (a full queue): it costs two ``sigaction`` calls. Off the
main thread (where Python never runs signal handlers) it does nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

_main_thread = threading.main_thread
_current_thread = threading.current_thread
_NONE = object()


class held_interrupts:
    """Within the block, a ``SIGINT`` is noted rather than handled; at its end, raised again."""

    __slots__ = ("_caught", "_previous")

    def __init__(self) -> None:
        self._previous: Any = _NONE
        self._caught = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._caught = True

    def __enter__(self) -> None:
        if _current_thread() is not _main_thread():
            return
        try:
            # A SIGINT already pending is run by the handler installed when it is
            # handled: from here on, ``_note``.
            self._previous = signal.signal(signal.SIGINT, self._note)
        except (ValueError, TypeError):  # not the main interpreter, or no handler to restore
            self._previous = _NONE

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        previous = self._previous
        if previous is _NONE:
            return
        self._previous = _NONE
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if self._caught:
            signal.raise_signal(signal.SIGINT)  # handled as it would have been, now
