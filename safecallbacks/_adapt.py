"""``auto`` revising its choice from what a handler does in its first events.

The class-level rule (``_policy``) cannot see everything. Three things only
show when hooks run, and each moves the handler once:

* an inline handler that blocks its caller past ``stall_threshold`` is moved
  off the token path for good (a stream stalls at most once);
* an offloaded handler whose hook writes a context variable is brought inline:
  the code after that hook must see what it published;
* an offloaded handler whose first deliveries all fail on a worker, at once and
  not for I/O (thread-bound state, such as a UI framework's session), is tried
  once in the caller; it stays there if that works, and is offloaded for good
  if it fails there too.

Every move is logged once and shows in ``stats().mode`` and ``mode_reason``.
Only the probing of the first deliveries and the stall check after an inline
call touch the token path: two clock reads per inline event.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._observe import Observer
from ._stopping import StopStream

PROBED_DELIVERIES = 64
"""Offloaded deliveries (per handler) checked for context writes and thread-bound failures."""
THREAD_TRIAL_AFTER = 3
"""Failures in a row, each at once and not I/O, after which the caller's thread is tried."""
AT_ONCE = 0.05  # seconds: a failure this fast did no real I/O, it may be about where it ran

_MISSING = object()


class Adaptable(Protocol):
    """What adapting needs from the engine it revises."""

    observer: Observer

    def request_mode(self, mode: str, reason: str, trial: bool = False) -> None: ...

    def switch_mode(self, mode: str, reason: str) -> None: ...

    wanted_mode: tuple[str, str, bool] | None

    def refresh(self) -> None: ...


class Adaptive:
    """One handler's revisions: probing offloaded deliveries, watching inline stalls."""

    __slots__ = ("_lock", "engine", "failures", "final", "probes", "stall_limit", "trial")

    def __init__(self, engine: Adaptable, enabled: bool, mode: str, threshold: float) -> None:
        self.engine = engine
        self.final = not enabled  # explicit modes and registrations are never revised
        self.probes = PROBED_DELIVERIES if enabled and mode == "offload" else 0
        self.stall_limit = threshold if enabled and mode == "inline" else float("inf")
        self.trial = False
        self.failures = 0  # first deliveries that failed in a row, at once, not I/O
        self._lock = threading.Lock()

    # --- offloaded: the first deliveries ---------------------------------------

    def probing(self, hook: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` wrapped to report context writes and failures (first deliveries only)."""
        if self.probes <= 0 or self.final:
            return call

        def probed(*args: Any, **kwargs: Any) -> Any:
            if self.probes <= 0:  # probed enough while this drain went on: plain from here
                return call(*args, **kwargs)
            self.probes -= 1
            before = contextvars.copy_context()
            started = time.monotonic()
            try:
                result = call(*args, **kwargs)
            except Exception as exc:
                if _thread_bound_suspect(exc, time.monotonic() - started):
                    self._failed_off_thread(hook, exc)
                else:
                    self.failures = -1  # this handler fails for other reasons
                raise
            else:
                self.failures = -1  # it works off the caller's thread
                return result
            finally:
                written = _written(before, contextvars.copy_context())
                if written is not None:
                    self._wrote_context(hook, written)

        return probed

    def _wrote_context(self, hook: str, var: str) -> None:
        with self._lock:
            if self.final:
                return
            self.probes = 0
        self.engine.request_mode("inline", f"{hook} writes context variable {var!r}")

    def _failed_off_thread(self, hook: str, exc: BaseException) -> None:
        with self._lock:
            if self.final or self.trial or self.failures < 0:
                return
            self.failures += 1
            if self.failures < THREAD_TRIAL_AFTER:
                return
            self.trial = True
            self.probes = 0
        reason = f"{hook} failed off the caller's thread ({type(exc).__qualname__})"
        self.engine.request_mode("inline", reason, trial=True)

    def trial_result(self, hook: str, error: BaseException | None) -> None:
        """The first inline call after a thread-bound failure: keep it there, or not."""
        self.trial = False
        if error is None:
            self.engine.refresh()  # the inline fast path is open again
            return
        self.final = True
        reason = f"fails in the caller too ({hook}: {type(error).__qualname__})"
        self.engine.switch_mode("offload", reason)

    def trial_abandoned(self) -> None:
        """Nobody emitted again to take the handler over: it stays offloaded."""
        self.trial = False
        self.engine.wanted_mode = None
        self.engine.refresh()

    # --- inline: the stall check ------------------------------------------------

    def stalled(self, hook: str, seconds: float) -> None:
        """An inline call blocked its caller past ``stall_threshold``: offload for good."""
        with self._lock:
            if self.final:
                return
            self.final = True
            self.stall_limit = float("inf")
        self.engine.switch_mode("offload", f"{hook} blocked its caller {seconds:.3g}s")

    def now_inline(self, threshold: float) -> None:
        if not self.final:
            self.stall_limit = threshold


def _thread_bound_suspect(exc: Exception, seconds: float) -> bool:
    """A failure that may be about the thread it ran on: immediate, and not I/O."""
    if isinstance(exc, (StopStream, OSError, TimeoutError)):
        return False
    return seconds < AT_ONCE


def _written(before: contextvars.Context, after: contextvars.Context) -> str | None:
    """The name of a variable whose value differs (by identity) between two contexts."""
    if len(after) != len(before):
        added = [var for var in after if var not in before]
        return added[0].name if added else "?"
    for var, value in after.items():
        if before.get(var, _MISSING) is not value:
            return var.name
    return None
