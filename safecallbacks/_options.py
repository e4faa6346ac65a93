"""Options shared by ``SafeHandler``, ``harden``, ``harden_config`` and ``install``, defined once.

``Options`` is the one source of the option names, defaults, types and
validation: the public signatures are generated from it (so ``help(harden)``
shows real defaults) and ``OptionValues`` (for type checkers) is pinned to it
by a test. Every bad value is rejected at construction with a message naming
the option, so a typo never surfaces as a silent default in the middle of a
stream. Nothing here runs on the token path.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from types import FunctionType
from typing import Any, Literal, TypeAlias, TypedDict

Mode: TypeAlias = Literal["auto", "offload", "inline"]
OnFull: TypeAlias = Literal["drop_newest", "drop_oldest", "block"]

MODES: tuple[str, ...] = ("auto", "offload", "inline")
ON_FULL: tuple[str, ...] = ("drop_newest", "drop_oldest", "block")

EXIT_TIMEOUT_ENV = "SAFECALLBACKS_EXIT_TIMEOUT"
DEFAULT_EXIT_TIMEOUT = 2.0


def _number(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number of seconds, got {value!r}")
    return float(value)


def _positive(option: str, value: object) -> float:
    seconds = _number(option, value)
    if seconds <= 0:
        raise ValueError(f"{option} must be a positive finite number of seconds, got {value!r}")
    return seconds


def _non_negative(option: str, value: object) -> float:
    seconds = _number(option, value)
    if seconds < 0:
        raise ValueError(f"{option} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object], object]:
    def check(option: str, value: object) -> object:
        if value not in choices:
            raise ValueError(f"{option} must be one of {choices}, got {value!r}")
        return value

    return check


def _count(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{option} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{option} must be >= 1, got {value!r}")
    return value


def _count_or_none(option: str, value: object) -> int | None:
    return None if value is None else _count(option, value)


def _flag(option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{option} must be a bool, got {value!r}")
    return value


def _label(option: str, value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{option} must be a non-empty string or None, got {value!r}")
    return value


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
        _positive("breaker reset", self.reset)


def _breaker(option: str, value: object) -> Breaker | None:
    if value is None or isinstance(value, Breaker):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Breaker(failures=value[0], reset=value[1])
    raise TypeError(
        f"{option} must be a safecallbacks.Breaker, a (failures, reset_seconds) tuple "
        f"or None, got {value!r}"
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


def _option(default: Any, check: Callable[[str, Any], Any], doc: str) -> Any:
    if isinstance(default, FunctionType):  # computed when the options are made
        return field(default_factory=default, metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class Options:
    """The validated settings of one hardened handler (see the Options table in docs/ways-in.md)."""

    mode: Mode = _option("auto", _one_of(MODES), "auto | offload | inline")
    max_queue: int = _option(10_000, _count, "events a handler's queue holds")
    on_full: OnFull = _option("drop_newest", _one_of(ON_FULL), "what a full queue does")
    block_timeout: float = _option(1.0, _positive, "longest wait of on_full='block'")
    timeout: float = _option(30.0, _positive, "longest time one event may take")
    breaker: Breaker | None = _option(Breaker(), _breaker, "circuit breaker, or None")
    name: str | None = _option(None, _label, "name in logs, metrics and stats")
    log_payloads: bool = _option(False, _flag, "may logs quote prompt and token text")
    summary_interval: float = _option(10.0, _positive, "seconds between failure summaries")
    stall_threshold: float = _option(1.0, _positive, "delay reported as a stall")
    exit_timeout: float = _option(default_exit_timeout, _non_negative, "budget at exit")
    settle: float = _option(0.5, _non_negative, "root run ends wait this long for backlog")
    max_concurrency: int | None = _option(
        None,
        _count_or_none,
        "deliveries to one handler at once, across runs (None: 32 worker threads for a sync "
        "handler, 256 tasks for an async one)",
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            checked = spec.metadata["check"](spec.name, getattr(self, spec.name))
            object.__setattr__(self, spec.name, checked)


OPTION_NAMES: tuple[str, ...] = tuple(spec.name for spec in fields(Options))


class OptionValues(TypedDict, total=False):
    """The options as keyword arguments, for type checkers (pinned to ``Options`` by a test)."""

    mode: Mode
    max_queue: int
    on_full: OnFull
    block_timeout: float
    timeout: float
    breaker: Breaker | tuple[int, float] | None
    name: str | None
    log_payloads: bool
    summary_interval: float
    stall_threshold: float
    exit_timeout: float
    settle: float
    max_concurrency: int | None


def make_options(**given: Any) -> Options:
    """Build ``Options`` from keyword arguments, rejecting unknown or bad values."""
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTION_NAMES)}"
        )
    return Options(**given)


def _shown_default(spec: Any) -> Any:
    return spec.default if spec.default is not MISSING else spec.default_factory()


def option_parameters() -> list[inspect.Parameter]:
    """The options as keyword-only parameters with their real defaults (for signatures)."""
    return [
        inspect.Parameter(
            spec.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=_shown_default(spec),
            annotation=spec.type,
        )
        for spec in fields(Options)
    ]


def with_option_signature(function: Callable[..., Any], *leading: inspect.Parameter) -> None:
    """Give ``function`` (which takes ``**options``) a signature listing every option."""
    signature = inspect.signature(function)
    rest = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    keep = [*leading, *rest] if leading else rest
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*keep, *option_parameters()]
    )
