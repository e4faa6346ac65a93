"""What the package logs, and where: structlog if configured, else the stdlib logger.

The first failure of each (handler, hook, error type) is logged with the
handler's own stack, then rate-limited summaries; prompt and token text only
with ``log_payloads=True``. Lines are decided under the observer's lock and
written after it is released, from the delivery side, never the token path.

Without a structlog configuration each event is one readable line on the
stdlib logger ``safecallbacks`` (``handler_failed handler=Audit hook=...``,
a traceback as real lines below it), prefixed with its level and logger name
when logging is not configured either. With structlog configured, the
application's processors apply, and ``handler_failed`` is written in the
failing event's own context, so the caller's bound contextvars are on it.
"""

from __future__ import annotations

import contextvars
import logging
import os
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

from ._isolation import error_type
from ._options import Options

Clock = Callable[[], float]
Line = tuple[str, str, dict[str, Any]]  # (level, event, fields)

_STDLIB = logging.getLogger("safecallbacks")
_MULTILINE = ("traceback", "exception")  # shown below the line, as real lines


def _shown(value: Any) -> str:
    text = str(value) if isinstance(value, (str, int, float, bool)) or value is None else None
    if text is None or not text or any(c in text for c in " \t\n\"'="):
        return repr(value)
    return text


def render_line(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    """``event key=value ...`` with any traceback below it (the stdlib fallback's renderer).

    Logging's last-resort handler prints the bare message, so where nothing is
    configured the level and logger name are put in front of it.
    """
    event = event_dict.pop("event", "")
    blocks = [str(event_dict.pop(key)).rstrip("\n") for key in _MULTILINE if key in event_dict]
    fields = " ".join(f"{key}={_shown(value)}" for key, value in event_dict.items())
    line = f"{event} {fields}".rstrip()
    if not _STDLIB.hasHandlers():
        line = f"{method.upper()} {_STDLIB.name}: {line}"
    return "\n".join([line, *blocks])


_stdlib_logger = structlog.wrap_logger(
    _STDLIB,
    processors=[structlog.processors.format_exc_info, render_line],
    wrapper_class=structlog.stdlib.BoundLogger,
)


def logger() -> Any:
    """The structlog logger to use now.

    An application that configured structlog gets our events through its own
    pipeline. One that did not would otherwise see them printed to stdout, so
    they go to the stdlib logger ``safecallbacks`` instead, where logging's
    usual configuration (or its last-resort stderr handler) decides.
    """
    if structlog.is_configured():
        return structlog.get_logger("safecallbacks")
    return _stdlib_logger


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _handler_stack(exc: BaseException) -> str:
    """The failure's stack without our own delivery frames: where the handler went wrong."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if not os.path.abspath(f.filename).startswith(_PACKAGE_DIR)]
    return "Handler stack (most recent call last):\n" + "".join(
        traceback.format_list(own or frames)
    )


def render_payload(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("run_id", "parent_run_id")}
    text = f"args={args!r} kwargs={shown!r}"
    return text if len(text) <= 2000 else text[:2000] + "…"


def _more(count: int) -> str:
    return "once more" if count == 1 else f"{count:,} more times"


def _seconds(value: float) -> str:
    if value < 0.1:
        return "under 0.1 s"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


class FailureLog:
    """First failure per (hook, error type) in full, then periodic summaries."""

    def __init__(self, handler: str, options: Options, clock: Clock) -> None:
        self.handler = handler
        self.payloads = options.log_payloads
        self.interval = options.summary_interval
        self.clock = clock
        self.seen: set[tuple[str, str]] = set()
        self.unreported: dict[tuple[str, str], int] = {}
        self.window_start: dict[tuple[str, str], float] = {}
        # Lines decided under the observer's lock, written after it is released:
        # a slow log sink must never hold a lock an emitting thread may need.
        self.lines: list[Line] = []

    def take_lines(self) -> list[Line]:
        lines, self.lines = self.lines, []
        return lines

    def failure(
        self, hook: str, exc: BaseException, run_id: object, payload: Callable[[], str]
    ) -> None:
        key = (hook, error_type(exc))
        now = self.clock()
        if key not in self.seen:
            self.seen.add(key)
            self.window_start[key] = now
            self._first(hook, exc, run_id, payload)
            return
        self.unreported[key] = self.unreported.get(key, 0) + 1
        if now - self.window_start[key] >= self.interval:
            self._summarise(key, now)

    def summarise_all(self) -> None:
        now = self.clock()
        for key in list(self.unreported):
            self._summarise(key, now)

    def _summarise(self, key: tuple[str, str], now: float) -> None:
        count = self.unreported.pop(key, 0)
        started = self.window_start.get(key, now)
        self.window_start[key] = now
        if count:
            fields = {
                "handler": self.handler,
                "hook": key[0],
                "error_type": key[1],
                "count": count,
                "seconds": round(now - started, 3),
                "message": f"failed {_more(count)} in {_seconds(now - started)}",
            }
            self.lines.append(("warning", "handler_failures_summary", fields))

    def _first(
        self, hook: str, exc: BaseException, run_id: object, payload: Callable[[], str]
    ) -> None:
        fields: dict[str, Any] = {
            "handler": self.handler,
            "hook": hook,
            "run_id": str(run_id) if run_id is not None else None,
            "error_type": error_type(exc),
        }
        if self.payloads:
            fields["error"] = str(exc)
            fields["payload"] = payload()
            fields["exc_info"] = exc
        else:
            # The message and locals may quote prompt or token text: keep only the stack.
            fields["traceback"] = _handler_stack(exc)
        self.lines.append(("error", "handler_failed", fields))


def write(lines: list[Line], context: contextvars.Context | None = None) -> None:
    """Write ``lines``; a failure of one event is written in that event's ``context``.

    So an application's structlog pipeline sees the caller's bound contextvars
    (a request id) on ``handler_failed``, even when it is logged by a worker.
    Summaries concern many callers and are written as they are.
    """
    for level, event, fields in lines:
        emit = getattr(logger(), level)
        if context is not None and event == "handler_failed":
            try:
                context.run(emit, event, **fields)
                continue
            except RuntimeError:  # that context is entered elsewhere right now
                pass
        emit(event, **fields)
