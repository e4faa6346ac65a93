"""The frozen ``Stats`` snapshot and the small fixed-memory estimator behind it."""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

_SUB_BUCKETS = 8  # per power of two: about 9% relative precision on quantiles
_EMPTY: Mapping[str, int] = MappingProxyType({})


class Estimator:
    """Count, mean, max and approximate quantiles of durations in fixed memory.

    Values fall into logarithmic buckets (eight per doubling), so memory stays
    a few hundred integers whatever the number of samples. Count, total and
    maximum are exact. Bucketing is what costs per value, so a large batch
    (more than ``SAMPLES_PER_BATCH`` values) is bucketed from one value per
    equal slice of it, weighted by the slice's size: quantiles then come from
    a stratified sample, the other figures stay exact. Not thread-safe: the
    owner serialises calls.
    """

    __slots__ = ("_buckets", "count", "maximum", "total")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.maximum = 0.0

    def copy(self) -> Estimator:
        made = Estimator()
        made._buckets = dict(self._buckets)
        made.count, made.total, made.maximum = self.count, self.total, self.maximum
        return made

    def merge(self, other: Estimator) -> None:
        """Add ``other``'s samples to this one (exact: buckets add up)."""
        for index, count in other._buckets.items():
            self._buckets[index] = self._buckets.get(index, 0) + count
        self.count += other.count
        self.total += other.total
        self.maximum = max(self.maximum, other.maximum)

    def add(self, seconds: float) -> None:
        self.add_many((seconds,))

    def add_many(self, values: Sequence[float]) -> float:
        """Add a batch of samples; returns the largest of them (0.0 for none)."""
        size = len(values)
        if not size:
            return 0.0
        self.count += size
        self.total += sum(values)
        largest = max(values)
        self.maximum = max(self.maximum, largest)
        buckets = self._buckets
        for position, weight in strata(size):
            index = _bucket(values[position])
            buckets[index] = buckets.get(index, 0) + weight
        return largest

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(_bucket_upper(index), self.maximum)
        return self.maximum

    def summary(self) -> Summary:
        if not self.count:
            return Summary()
        return Summary(
            count=self.count,
            mean=self.total / self.count,
            p50=self.quantile(0.5),
            p99=self.quantile(0.99),
            max=self.maximum,
        )


SAMPLES_PER_BATCH = 32
"""Values of one batch that are bucketed (and recorded to OTel histograms) at most."""


def strata(size: int) -> list[tuple[int, int]]:
    """(position, weight) of the values of a batch of ``size`` to bucket; weights sum to ``size``.

    Every value of a small batch; for a larger one a value at a random position
    in each of ``SAMPLES_PER_BATCH`` equal slices, weighted by the slice's
    length. Random rather than fixed positions, so a periodic pattern (every
    tenth event slow) cannot fall between the picks.
    """
    if size <= SAMPLES_PER_BATCH:
        return [(position, 1) for position in range(size)]
    pick = random.random
    return [(start + int(pick() * length), length) for start, length in _slices(size)]


@functools.lru_cache(maxsize=128)
def _slices(size: int) -> tuple[tuple[int, int], ...]:
    """(start, length) of ``SAMPLES_PER_BATCH`` equal slices of ``size`` values."""
    bounds = [number * size // SAMPLES_PER_BATCH for number in range(SAMPLES_PER_BATCH + 1)]
    return tuple((start, end - start) for start, end in itertools.pairwise(bounds))


def _bucket(seconds: float) -> int:
    if seconds < 1e-9:
        return -1
    # frexp splits x into m * 2**e with 0.5 <= m < 1: e picks the doubling,
    # m the sub-bucket inside it (cheaper than a log).
    mantissa, exponent = math.frexp(seconds * 1e9)
    return exponent * _SUB_BUCKETS + int((mantissa - 0.5) * 2 * _SUB_BUCKETS)


def _bucket_upper(index: int) -> float:
    if index < 0:
        return 1e-9
    exponent, sub = divmod(index, _SUB_BUCKETS)
    return float(math.ldexp(0.5 + (sub + 1) / (2 * _SUB_BUCKETS), exponent) / 1e9)


@dataclass(frozen=True)
class Summary:
    """Count, mean, median, 99th percentile and maximum of a duration, in seconds."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    def __repr__(self) -> str:
        if not self.count:
            return "Summary(count=0)"
        return (
            f"Summary(count={self.count}, mean={_ms(self.mean)}, p50={_ms(self.p50)}, "
            f"p99={_ms(self.p99)}, max={_ms(self.max)})"
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}ms"


@dataclass(frozen=True)
class HookStats:
    """Outcome counts of one hook.

    ``emitted == delivered + failed + dropped + skipped + pending``.
    """

    emitted: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    skipped: int = 0
    pending: int = 0


@dataclass(frozen=True)
class Stats:
    """A frozen snapshot of one hardened handler.

    ``emitted`` is counted on the emitting side, independently of the outcome
    counters, so ``emitted == delivered + failed + dropped + skipped + pending``
    is a real check: after a successful ``flush()`` it holds with
    ``pending == 0``.
    """

    handler: str
    mode: str
    emitted: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    skipped: int = 0
    pending: int = 0
    hooks: Mapping[str, HookStats] = field(default_factory=lambda: MappingProxyType({}))
    errors: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    handler_time: Summary = Summary()
    lag: Summary = Summary()
    queue_depth: int = 0
    queue_high_water: int = 0
    stuck: bool = False
    breaker: str = "closed"
    closed: bool = False
    stops_too_late: int = 0
    mode_reason: str = ""

    def __repr__(self) -> str:
        counts = (
            f"emitted={self.emitted}, delivered={self.delivered}, failed={self.failed}, "
            f"dropped={self.dropped}, skipped={self.skipped}, pending={self.pending}"
        )
        extras = [
            f"queue_depth={self.queue_depth}",
            f"queue_high_water={self.queue_high_water}",
            f"breaker={self.breaker!r}",
        ]
        if self.stuck:
            extras.append("stuck=True")
        if self.closed:
            extras.append("closed=True")
        if self.stops_too_late:
            extras.append(f"stops_too_late={self.stops_too_late}")
        if self.errors:
            extras.append(f"errors={dict(self.errors)!r}")
        hooks = ", ".join(
            f"{hook}: {h.delivered}/{h.emitted}" for hook, h in sorted(self.hooks.items())
        )
        return (
            f"Stats(handler={self.handler!r}, mode={self.mode!r} ({self.mode_reason}), {counts},\n"
            f"      {', '.join(extras)},\n"
            f"      handler_time={self.handler_time!r},\n"
            f"      lag={self.lag!r},\n"
            f"      hooks(delivered/emitted)={{{hooks}}})"
        )


def merge_stats(
    own: Stats, others: Iterable[Stats], estimators: Iterable[tuple[Estimator, Estimator]]
) -> Stats:
    """One snapshot for a handler and the copies LangChain made of it: counts add up."""
    parts = [own, *others]
    hooks: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    for part in parts:
        for hook, row in part.hooks.items():
            into = hooks.setdefault(hook, [0] * 6)
            for i, value in enumerate(
                (row.emitted, row.delivered, row.failed, row.dropped, row.skipped, row.pending)
            ):
                into[i] += value
        for error_name, count in part.errors.items():
            errors[error_name] = errors.get(error_name, 0) + count
    duration, lag = Estimator(), Estimator()
    for member_duration, member_lag in estimators:
        duration.merge(member_duration)
        lag.merge(member_lag)
    return Stats(
        handler=own.handler,
        mode=own.mode,
        emitted=sum(p.emitted for p in parts),
        delivered=sum(p.delivered for p in parts),
        failed=sum(p.failed for p in parts),
        dropped=sum(p.dropped for p in parts),
        skipped=sum(p.skipped for p in parts),
        pending=sum(p.pending for p in parts),
        hooks=MappingProxyType({hook: HookStats(*row) for hook, row in hooks.items()}),
        errors=MappingProxyType(errors),
        handler_time=duration.summary(),
        lag=lag.summary(),
        queue_depth=sum(p.queue_depth for p in parts),
        queue_high_water=max(p.queue_high_water for p in parts),
        stuck=any(p.stuck for p in parts),
        breaker=own.breaker,
        closed=own.closed,
        stops_too_late=sum(p.stops_too_late for p in parts),
        mode_reason=own.mode_reason,
    )
