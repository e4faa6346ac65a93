"""OpenTelemetry instruments, through ``opentelemetry-api`` only.

The application brings the SDK; without one the API's no-op meter makes every
call here nearly free, and histograms are not even computed. Instruments are
recorded by the delivery side in batches, never on the token path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics

from ._compat import fork_safe, sdk_configured

__all__ = ["instruments", "register_depth_source", "sdk_configured"]


def _version() -> str:
    from . import __version__

    return __version__


class _Instruments:
    """The package's OpenTelemetry instruments on one meter provider."""

    def __init__(self, provider: metrics.MeterProvider) -> None:
        meter = provider.get_meter("safecallbacks", _version())
        self.events = meter.create_counter(
            "safecallbacks.events",
            unit="{event}",
            description="Callback events by outcome (delivered, failed, dropped, skipped).",
        )
        self.duration = meter.create_histogram(
            "safecallbacks.handler.duration",
            unit="s",
            description="Time the wrapped handler spent on one event.",
        )
        self.lag = meter.create_histogram(
            "safecallbacks.delivery.lag",
            unit="s",
            description="Time from emission of an event to the start of its delivery.",
        )
        self.breaker_changes = meter.create_counter(
            "safecallbacks.breaker.state_changes",
            unit="{change}",
            description="Circuit-breaker transitions, by the state entered.",
        )
        meter.create_observable_gauge(
            "safecallbacks.queue.depth",
            callbacks=[_observe_depths],
            unit="{event}",
            description="Events waiting for delivery, per handler.",
        )


_instruments_lock = fork_safe(threading.Lock())
_instruments_by_provider: dict[int, tuple[metrics.MeterProvider, _Instruments]] = {}
_depth_sources: list[Callable[[], Iterable[tuple[str, int]]]] = []


def register_depth_source(source: Callable[[], Iterable[tuple[str, int]]]) -> None:
    """Let the dispatcher report queue depths to the observable gauge."""
    _depth_sources.append(source)


def _observe_depths(_options: Any) -> Iterable[metrics.Observation]:
    # One observation per handler name: the SDK keeps only the last one of an attribute
    # set, and handlers sharing a name (one per request) must add up, not overwrite.
    totals: dict[str, int] = {}
    for source in _depth_sources:
        for name, depth in source():
            totals[name] = totals.get(name, 0) + depth
    for name, depth in totals.items():
        yield metrics.Observation(depth, {"handler": name})


def instruments() -> _Instruments:
    """The instruments for the current global meter provider (created once per provider)."""
    provider = metrics.get_meter_provider()
    found = _instruments_by_provider.get(id(provider))
    if found is not None and found[0] is provider:
        return found[1]
    with _instruments_lock:
        made = _Instruments(provider)
        _instruments_by_provider[id(provider)] = (provider, made)
        return made
