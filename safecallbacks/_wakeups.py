"""Callbacks handed from a worker thread to an event loop, a burst at the cost of one.

``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call, so the loop
wakes once per callback. When many async root runs end together, a worker releases their
settle barriers in one burst, and per-barrier wake-ups were most of what a run's settle
cost: ``call_soon_from_thread`` schedules one call per loop and lets the callbacks that
arrive while it is pending ride on it, in the order they came.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

_lock = threading.Lock()


class _Due:
    __slots__ = ("callbacks", "scheduled")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.scheduled = False  # set once the loop's call is known to be on its way


_due: dict[asyncio.AbstractEventLoop, _Due] = {}


def call_soon_from_thread(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop`` soon; nothing happens once the loop is closed."""
    with _lock:
        due = _due.get(loop)
        if due is None:
            _forget_closed()  # a loop closed with its call pending would stay here
            due = _due[loop] = _Due()
        due.callbacks.append(callback)
        if due.scheduled:
            return  # the pending call runs this one too
    if loop.is_closed():
        _drop(loop)
        return
    try:
        loop.call_soon_threadsafe(_run_due, loop)
    except RuntimeError:  # closed since: nothing on it can be waiting any more
        _drop(loop)
        return
    # Ctrl-C before this line leaves the call unmarked: the next callback schedules
    # another, and a second call finds nothing or runs what came since.
    due.scheduled = True


def _run_due(loop: asyncio.AbstractEventLoop) -> None:
    with _lock:
        due = _due.pop(loop, None)
    for callback in due.callbacks if due is not None else ():
        try:
            callback()
        except Exception as exc:  # each on its own, as separate loop callbacks would be
            loop.call_exception_handler(
                {"message": "safecallbacks: a callback from a worker raised", "exception": exc}
            )


def _drop(loop: asyncio.AbstractEventLoop) -> None:
    with _lock:
        _due.pop(loop, None)


def _forget_closed() -> None:
    for loop in [loop for loop in _due if loop.is_closed()]:
        del _due[loop]


def _reset_after_fork() -> None:
    """A fork copies ``_lock`` as it was: held, if another thread had it."""
    global _lock
    _lock = threading.Lock()
    _due.clear()  # the parent's loops do not run here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def pending_loops() -> int:
    """Loops with a call pending (for tests: closed loops must not stay)."""
    with _lock:
        return len(_due)
