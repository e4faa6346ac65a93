"""Options shared by ``SafeHandler``, ``harden`` and ``harden_config``, validated once.

Every bad value is rejected at construction with a message naming the option,
so a typo never surfaces as a silent default in the middle of a stream.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

Mode: TypeAlias = Literal["auto", "offload", "inline"]
OnFull: TypeAlias = Literal["drop_newest", "drop_oldest", "block"]

MODES: tuple[str, ...] = ("auto", "offload", "inline")
ON_FULL: tuple[str, ...] = ("drop_newest", "drop_oldest", "block")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_TIMEOUT = 30.0
DEFAULT_BLOCK_TIMEOUT = 1.0
EXIT_TIMEOUT_ENV = "SAFECALLBACKS_EXIT_TIMEOUT"
DEFAULT_EXIT_TIMEOUT = 2.0


@dataclass(frozen=True)
class Breaker:
    """Circuit-breaker settings: open after ``failures`` consecutive failures.

    While open the handler is skipped (each skip counted) for ``reset`` seconds;
    then one trial event decides whether it closes again or re-opens.
    """

    failures: int = 20
    reset: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.failures, bool) or not isinstance(self.failures, int):
            raise TypeError(f"breaker failures must be an int, got {self.failures!r}")
        if self.failures < 1:
            raise ValueError(f"breaker failures must be >= 1, got {self.failures!r}")
        _positive_number("breaker reset", self.reset)


@dataclass(frozen=True)
class Options:
    """The validated settings of one hardened handler."""

    mode: Mode = "auto"
    max_queue: int = DEFAULT_MAX_QUEUE
    on_full: OnFull = "drop_newest"
    block_timeout: float = DEFAULT_BLOCK_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    breaker: Breaker | None = field(default_factory=Breaker)
    name: str | None = None
    log_payloads: bool = False
    summary_interval: float = 10.0
    stall_threshold: float = 1.0
    exit_timeout: float = DEFAULT_EXIT_TIMEOUT
    settle: float = 0.0


_UNSET: Any = object()
OPTION_NAMES: tuple[str, ...] = (
    "mode",
    "max_queue",
    "on_full",
    "block_timeout",
    "timeout",
    "breaker",
    "name",
    "log_payloads",
    "summary_interval",
    "stall_threshold",
    "exit_timeout",
    "settle",
)


def _positive_number(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{option} must be a positive finite number of seconds, got {value!r}")
    return float(value)


def _non_negative_number(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{option} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _breaker(value: object) -> Breaker | None:
    if value is None or isinstance(value, Breaker):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Breaker(failures=value[0], reset=value[1])
    raise TypeError(
        f"breaker must be a safecallbacks.Breaker, a (failures, reset_seconds) tuple "
        f"or None, got {value!r}"
    )


def make_options(**given: Any) -> Options:
    """Build ``Options`` from keyword arguments, rejecting unknown or bad values."""
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTION_NAMES)}"
        )
    values = {k: v for k, v in given.items() if v is not _UNSET}
    mode = values.get("mode", "auto")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    on_full = values.get("on_full", "drop_newest")
    if on_full not in ON_FULL:
        raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
    max_queue = values.get("max_queue", DEFAULT_MAX_QUEUE)
    if isinstance(max_queue, bool) or not isinstance(max_queue, int):
        raise TypeError(f"max_queue must be an int, got {max_queue!r}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")
    name = values.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string or None, got {name!r}")
    log_payloads = values.get("log_payloads", False)
    if not isinstance(log_payloads, bool):
        raise TypeError(f"log_payloads must be a bool, got {log_payloads!r}")
    return Options(
        mode=mode,
        max_queue=max_queue,
        on_full=on_full,
        block_timeout=_positive_number(
            "block_timeout", values.get("block_timeout", DEFAULT_BLOCK_TIMEOUT)
        ),
        timeout=_positive_number("timeout", values.get("timeout", DEFAULT_TIMEOUT)),
        breaker=_breaker(values.get("breaker", Breaker())),
        name=name,
        log_payloads=log_payloads,
        summary_interval=_positive_number("summary_interval", values.get("summary_interval", 10.0)),
        stall_threshold=_positive_number("stall_threshold", values.get("stall_threshold", 1.0)),
        exit_timeout=_non_negative_number(
            "exit_timeout", values.get("exit_timeout", default_exit_timeout())
        ),
        settle=_non_negative_number("settle", values.get("settle", 0.0)),
    )


def default_exit_timeout() -> float:
    """Total seconds pending events get at interpreter exit (env-overridable)."""
    raw = os.environ.get(EXIT_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_EXIT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_EXIT_TIMEOUT
    return value if math.isfinite(value) and value >= 0 else DEFAULT_EXIT_TIMEOUT
