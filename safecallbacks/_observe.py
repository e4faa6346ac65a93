"""Accounting for one hardened handler: counts per outcome and hook, timings, and ``Stats``.

Consumers deliver events in batches and ``commit`` each batch under one
lock, so a snapshot is always one consistent state. The emitting side only
bumps a lock-free counter (``emitted``) and, for drops, a counted in-memory
record: log lines and metrics go out from the delivery side. The breaker,
logs and metrics live in their own modules; this one ties them together.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ._breaker import BreakerState, Clock
from ._compat import count_value
from ._hooks import ERROR_HOOKS, PAIRED_HOOKS
from ._isolation import error_type
from ._logs import FailureLog, logger, render_payload, write
from ._metrics import instruments, sdk_configured
from ._options import Options
from ._stats import Estimator, HookStats, Stats, strata

_now = time.monotonic
WAITING_TO_LOG: deque[Observer] = deque()
"""Observers with log lines queued on an emitting thread (appends are atomic)."""

DELIVERED, FAILED, DROPPED, SKIPPED = "delivered", "failed", "dropped", "skipped"
# Columns of a per-hook row of outcome counts.
_DELIVERED, _FAILED, _DROPPED, _SKIPPED = range(4)
_EMPTY_ROW = (0, 0, 0, 0)
_MAX_TRACKED_RUNS = 10_000


class Batch:
    """Delivery results gathered by a consumer, committed to the ``Observer`` at once.

    Per attempt a consumer appends only its hook, duration and lag; failures
    are counted apart, and outcomes per hook are worked out when the batch is
    committed or read (``outcomes``), so the per-event work stays a few list
    appends. It never holds the exceptions themselves: a traceback keeps the
    delivering frame alive, and a batch of those would turn every failure into
    garbage collector work.
    """

    __slots__ = ("durations", "failures", "hooks", "lags", "settled", "skipped")

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.lags: list[float] = []
        self.hooks: list[str] = []  # one per attempt, failed ones included
        self.failures: dict[tuple[str, str], int] = {}  # (hook, error type) -> attempts
        self.settled: dict[str, int] = {}  # deliveries counted elsewhere (inline calls)
        self.skipped: dict[str, int] = {}  # refused by an open breaker, counted per batch

    def add(self, hook: str, error_name: str | None, duration: float, lag: float) -> None:
        self.durations.append(duration)
        self.lags.append(lag)
        self.hooks.append(hook)  # before the failure: a concurrent reader never sees
        if error_name is not None:  # more failures of a hook than attempts of it
            key = (hook, error_name)
            self.failures[key] = self.failures.get(key, 0) + 1

    def outcomes(self) -> dict[tuple[str, str | None], int]:
        """Attempts per (hook, error type), ``None`` for delivered; safe beside the consumer.

        Skips are not attempts: they are in ``skipped``.
        """
        failures = dict(self.failures)  # copied before the hooks, for the order ``add`` keeps
        attempts = Counter(self.hooks[:])
        attempts.update(self.settled)
        found: dict[tuple[str, str | None], int] = {}
        for (hook, error_name), count in failures.items():
            found[(hook, error_name)] = count
            attempts[hook] -= count
        for hook, count in attempts.items():
            if count > 0:
                found[(hook, None)] = count
        return found

    def __len__(self) -> int:
        return len(self.durations)


def fit_pending(
    queued: Mapping[str, int], rows: Mapping[str, list[int]], pending: int
) -> dict[str, int]:
    """Pending per hook, summing to ``pending`` (the emitted count less the outcomes).

    The counters are exact; the queues are read a moment before them, without
    the consumers' help, so an event may be seen both queued and delivered (one
    a worker just took) or not at all (one emitted since, or in a worker's
    hands). The queues' view is fitted to the counters' so that a snapshot's
    totals are the sums of its rows: extra events are taken from the hooks with
    most waiting, missing ones given to the busiest hook. Knowing no hook at
    all (the first events), nothing is pending yet.
    """
    found = {hook: count for hook, count in queued.items() if count > 0}
    excess = sum(found.values()) - pending
    while excess > 0:
        hook = max(sorted(found), key=found.__getitem__)
        taken = min(found[hook], excess)
        found[hook] -= taken
        excess -= taken
        if not found[hook]:
            del found[hook]
    if excess < 0 and (found or rows):
        hook = _busiest(found, rows)
        found[hook] = found.get(hook, 0) - excess
    return found


def _busiest(found: Mapping[str, int], rows: Mapping[str, list[int]]) -> str:
    return max(
        sorted({*found, *rows}), key=lambda hook: (found.get(hook, 0), sum(rows.get(hook, ())))
    )


class Observer:
    """Counts, timings, breaker and logs of one hardened handler.

    Delivery results arrive in batches (``commit``) so that the per-event
    cost on the worker stays a few hundred nanoseconds.
    """

    def __init__(self, name: str, options: Options, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.options = options
        self.clock = clock
        self.emitted = itertools.count()
        self._lock = threading.Lock()
        self._hooks: dict[str, list[int]] = {}
        self._errors: dict[str, int] = {}
        self._duration = Estimator()
        self._lag = Estimator()
        self._open_runs: dict[object, None] = {}
        self._announced: set[str] = set()
        self._pending_logs: list[tuple[str, dict[str, Any]]] = []
        # Drops and skips not yet added to the OpenTelemetry counter (the next commit does).
        self._unreported: dict[tuple[str, str], int] = {}
        self._last_stall = -math.inf
        breaker = options.breaker
        self.breaker = BreakerState(
            breaker.failures if breaker else None, breaker.reset if breaker else 0.0, clock
        )
        self._log = FailureLog(name, options, clock)
        self._attrs: dict[tuple[str, str, str], dict[str, str]] = {}
        self.on_breaker_change: Callable[[], None] | None = None
        self.on_success: Callable[[], None] | None = None
        self._stops_too_late = 0

    # --- emitting side ---------------------------------------------------

    def dropped(self, hook: str, count: int = 1, reason: str = "queue_full") -> None:
        """Count events that will never be delivered (full queue, closed, lost loop)."""
        with self._lock:
            self._bump(hook, _DROPPED, count)
            # Reported to OpenTelemetry by the next commit, off the emitting thread.
            key = (hook, DROPPED)
            self._unreported[key] = self._unreported.get(key, 0) + count
        if reason != "exit":  # drops at exit are reported once for the whole process
            self.announce_once("drop", "events_dropped", reason=reason, hook=hook)

    def emitted_and_dropped(self, hook: str, reason: str = "queue_full") -> None:
        """Count a new event as emitted and at once as dropped: both or neither.

        Ctrl-C lands between two calls: nothing after the count is one, so an
        interrupt right after it still counts the drop.
        """
        with self._lock:
            row = self._hooks.get(hook)
            if row is None:
                row = self._hooks[hook] = list(_EMPTY_ROW)
            try:
                next(self.emitted)
            except BaseException:
                row[_DROPPED] += 1
                raise
            row[_DROPPED] += 1
            key = (hook, DROPPED)
            self._unreported[key] = self._unreported.get(key, 0) + 1
        if reason != "exit":
            self.announce_once("drop", "events_dropped", reason=reason, hook=hook)

    def flush_timed_out(self, pending: int, timeout: float) -> None:
        logger().warning(
            "flush_timed_out", handler=self.name, pending=pending, timeout_s=round(timeout, 3)
        )

    def stop_too_late(self, reason: str) -> None:
        """A ``StopStream`` arrived after every run it could stop had ended (delivery side)."""
        with self._lock:
            self._stops_too_late += 1
        self.announce_once(
            "stop_too_late",
            "stop_too_late",
            reason=reason,
            hint="the run ended before this offloaded StopStream was delivered; "
            "a handler that must stop fast streams should run with mode='inline'",
        )

    def announce_once(self, key: str, event: str, **fields: Any) -> None:
        """Log ``event`` the first time ``key`` happens for this handler.

        Only queued here: this runs on emitting threads too, and a log sink may
        block. ``emit_pending`` writes it from the delivery side (the next commit,
        the watchdog, a flush, a stats read, or exit).
        """
        if key in self._announced:
            return
        self._announced.add(key)
        self._pending_logs.append((event, fields))
        WAITING_TO_LOG.append(self)  # found by the watchdog or at exit, handler closed or not

    def emit_pending(self) -> None:
        """Write the log lines ``announce_once`` queued (never on the token path)."""
        pending = self._pending_logs
        while pending:
            try:
                event, fields = pending.pop(0)
            except IndexError:
                return
            logger().warning(event, handler=self.name, **fields)

    # --- delivery side ---------------------------------------------------

    def admit(self, hook: str, run_id: object, batch: Batch | None = None) -> bool:
        """Breaker check before delivering one event; a refusal is counted as skipped
        (in ``batch`` when given, so that it is committed with the strand's other results)."""
        breaker = self.breaker
        if breaker.state == "closed":
            return True
        with self._lock:
            allowed, entered = breaker.admit()
            if not allowed and hook.endswith(("_end", "_error")) and run_id in self._open_runs:
                allowed = True  # let handlers that pair starts with ends close what they opened
            if not allowed and batch is not None:
                batch.skipped[hook] = batch.skipped.get(hook, 0) + 1
            elif not allowed:
                self._bump(hook, _SKIPPED, 1)
                key = (hook, SKIPPED)
                self._unreported[key] = self._unreported.get(key, 0) + 1
        if entered:
            self.breaker_changed(entered)
        return allowed

    def failure(
        self,
        hook: str,
        exc: BaseException,
        run_id: object,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        context: contextvars.Context | None = None,
    ) -> str:
        """Note a failure at once (breaker, first-failure log); returns its error type.

        ``context`` is the failing event's own (its first-failure line is logged in it).
        """

        def payload() -> str:  # only rendered when the user opted in to payload logging
            return render_payload(args, kwargs or {})

        with self._lock:
            entered = self.breaker.failed()
            self._log.failure(hook, exc, run_id, payload)
            lines = self._log.take_lines()
        write(lines, context)
        if entered:
            self.breaker_changed(entered)
        return error_type(exc)

    def add_result(
        self,
        batch: Batch,
        hook: str,
        run_id: object,
        error: BaseException | None,
        started: float,
        emitted_at: float,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        context: contextvars.Context | None = None,
    ) -> None:
        """Settle one delivery attempt at once (breaker, runs, first-failure log) into ``batch``."""
        if error is None:
            self.outcome(True)
            error_name = None
            if hook in PAIRED_HOOKS:
                self.track_run(hook, run_id)
        else:
            error_name = self.failure(hook, error, run_id, args, kwargs, context)
        batch.add(hook, error_name, _now() - started, started - emitted_at)

    def outcome(self, ok: bool) -> None:
        """Feed one result to the breaker at once (counts wait for ``commit``)."""
        breaker = self.breaker
        if ok and self.on_success is not None:
            self.on_success()
        if ok and breaker.state == "closed":
            breaker.consecutive = 0
            return
        with self._lock:
            entered = breaker.succeeded() if ok else breaker.failed()
        if entered:
            self.breaker_changed(entered)

    def commit(self, batch: Batch, holder: Any = None, scope: Any = None) -> Batch:
        """Record a batch of delivery attempts; returns a fresh batch.

        With ``holder`` (a lane), the fresh batch replaces ``holder.batch`` under
        the same lock, so ``snapshot`` never counts a batch twice or not at all. An
        empty batch with nothing else waiting (a run's end right after a barrier's part,
        a strand retiring) is handed back as it is: only its holder's thread adds to it.
        """
        if not (
            batch.hooks or batch.skipped or batch.settled or self._unreported or self._pending_logs
        ):
            return batch
        fresh = Batch()
        with self._lock:
            if holder is not None:
                holder.batch = fresh
            if scope is None:
                scope = getattr(holder, "scope", None)  # a strand of a request scope
            drops, self._unreported = self._unreported, {}
            longest = self._duration.add_many(batch.durations)
            latest = self._lag.add_many(batch.lags)
            outcomes = batch.outcomes()
            for hook, count in batch.skipped.items():
                self._bump(hook, _SKIPPED, count)
                drops[(hook, SKIPPED)] = drops.get((hook, SKIPPED), 0) + count
            for (hook, error_name), count in outcomes.items():
                if error_name is None:
                    self._bump(hook, _DELIVERED, count)
                else:
                    self._bump(hook, _FAILED, count)
                    self._errors[error_name] = self._errors.get(error_name, 0) + count
        if scope is not None:
            scope.absorb(batch)  # after the swap: a scope's reader never counts it twice
        self._report_drops(drops)
        self.emit_pending()
        if not batch.durations:
            return fresh
        found = instruments()
        for (hook, error_name), count in outcomes.items():
            outcome = DELIVERED if error_name is None else FAILED
            found.events.add(count, self._attributes(hook, outcome, error_name or ""))
        if sdk_configured():
            self._record_histograms(batch)
        threshold = self.options.stall_threshold
        if longest >= threshold or latest >= threshold:
            self._report_stall(batch)
        return fresh

    def _record_histograms(self, batch: Batch) -> None:
        """Duration and lag of the batch's events; of a sample of them for a large batch.

        Recording a histogram value costs more than delivering a no-op event,
        so a batch larger than ``SAMPLES_PER_BATCH`` records the same
        stratified sample the ``Stats`` quantiles use (the event counter
        stays exact).
        """
        found = instruments()
        handler_only = {"handler": self.name}
        hooks, durations, lags = batch.hooks, batch.durations, batch.lags
        for position, _ in strata(len(durations)):
            found.duration.record(durations[position], self._attributes(hooks[position], "", ""))
            found.lag.record(lags[position], handler_only)

    def _report_stall(self, batch: Batch) -> None:
        now = self.clock()
        if now - self._last_stall < self.options.summary_interval:
            return
        self._last_stall = now
        worst = max(
            range(len(batch.durations)), key=lambda i: max(batch.durations[i], batch.lags[i])
        )
        logger().warning(
            "handler_stalled",
            handler=self.name,
            hook=batch.hooks[worst],
            lag_s=round(batch.lags[worst], 4),
            duration_s=round(batch.durations[worst], 4),
        )

    def summarise(self) -> None:
        with self._lock:
            self._log.summarise_all()
            lines = self._log.take_lines()
            drops, self._unreported = self._unreported, {}
        write(lines)
        self._report_drops(drops)
        self.emit_pending()

    def _report_drops(self, unreported: Mapping[tuple[str, str], int]) -> None:
        """Add drops and skips to the OpenTelemetry counter, a batch at a time."""
        if unreported:
            counter = instruments().events
            for (hook, outcome), count in unreported.items():
                counter.add(count, self._attributes(hook, outcome, ""))

    def track_run(self, hook: str, run_id: object) -> None:
        """Remember runs whose start was delivered, so an open breaker still lets their end by."""
        if run_id is None:
            return
        if hook.endswith("_start"):
            self._open_runs[run_id] = None
            if len(self._open_runs) > _MAX_TRACKED_RUNS:
                self._open_runs.pop(next(iter(self._open_runs)))
        elif hook.endswith("_end") or hook in ERROR_HOOKS:
            self._open_runs.pop(run_id, None)

    def breaker_changed(self, state: str) -> None:
        if self.on_breaker_change is not None:
            self.on_breaker_change()  # the engine's fast paths depend on the breaker
        instruments().breaker_changes.add(1, {"handler": self.name, "state": state})
        logger().warning("breaker_state_changed", handler=self.name, state=state)

    def _bump(self, hook: str, index: int, count: int) -> None:
        row = self._hooks.get(hook)
        if row is None:
            row = self._hooks[hook] = list(_EMPTY_ROW)
        row[index] += count

    def _attributes(self, hook: str, outcome: str, error_name: str) -> dict[str, str]:
        key = (hook, outcome, error_name)
        found = self._attrs.get(key)
        if found is None:
            found = {"handler": self.name, "hook": hook}
            if outcome:
                found["outcome"] = outcome
            if error_name:
                found["error.type"] = error_name
            self._attrs[key] = found
        return found

    # --- reading ----------------------------------------------------------

    def snapshot(
        self,
        inline_events: int,
        mode: str,
        mode_reason: str,
        queued: Mapping[str, int],
        queue_depth: int,
        high_water: int,
        stuck: bool,
        closed: bool,
        live: Callable[[], Iterable[Batch]] = tuple,
    ) -> Stats:
        """A consistent snapshot; ``live`` yields the batches consumers are still filling.

        ``inline_events`` were emitted and delivered on the inline fast path,
        which counts both with one counter.
        """
        with self._lock:
            rows = {hook: list(row) for hook, row in self._hooks.items()}
            errors = dict(self._errors)
            for batch in live():  # delivered but not committed yet: counted the same way
                for hook, count in dict(batch.skipped).items():
                    rows.setdefault(hook, list(_EMPTY_ROW))[_SKIPPED] += count
                for (hook, error_name), count in batch.outcomes().items():
                    row = rows.setdefault(hook, list(_EMPTY_ROW))
                    row[_DELIVERED if error_name is None else _FAILED] += count
                    if error_name is not None:
                        errors[error_name] = errors.get(error_name, 0) + count
            duration = self._duration.summary()
            lag = self._lag.summary()
            breaker = self.breaker.state if self.breaker.threshold is not None else "disabled"
        totals = [sum(row[column] for row in rows.values()) for column in range(len(_EMPTY_ROW))]
        counted = count_value(self.emitted) + inline_events  # read last: it covers the rows
        pending = fit_pending(queued, rows, max(counted - sum(totals), 0))
        per_hook = {}
        for hook in set(rows) | set(pending):
            row = rows.get(hook, list(_EMPTY_ROW))
            waiting = pending.get(hook, 0)
            per_hook[hook] = HookStats(
                emitted=sum(row) + waiting,
                delivered=row[_DELIVERED],
                failed=row[_FAILED],
                dropped=row[_DROPPED],
                skipped=row[_SKIPPED],
                pending=waiting,
            )
        return Stats(
            handler=self.name,
            mode=mode,
            mode_reason=mode_reason,
            emitted=sum(totals) + sum(pending.values()),
            delivered=totals[_DELIVERED],
            failed=totals[_FAILED],
            dropped=totals[_DROPPED],
            skipped=totals[_SKIPPED],
            pending=sum(pending.values()),
            hooks=MappingProxyType(per_hook),
            errors=MappingProxyType(errors),
            handler_time=duration,
            lag=lag,
            queue_depth=queue_depth,
            queue_high_water=high_water,
            stuck=stuck,
            breaker=breaker,
            closed=closed,
            stops_too_late=self._stops_too_late,
        )

    def estimators(self) -> tuple[Estimator, Estimator]:
        """Copies of the handler-time and lag estimators (to merge a family's stats)."""
        with self._lock:
            return self._duration.copy(), self._lag.copy()

    def set_clock(self, clock: Clock) -> None:
        """Use ``clock`` for the breaker, log windows and stall reports (tests)."""
        self.clock = self.breaker.clock = self._log.clock = clock

    def reset_after_fork(self) -> None:
        callbacks = self.on_breaker_change, self.on_success
        self.__init__(self.name, self.options, self.clock)  # type: ignore[misc]
        self.on_breaker_change, self.on_success = callbacks


def write_waiting_logs() -> None:
    """Write every line queued on an emitting thread (watchdog, exit; never the token path)."""
    while WAITING_TO_LOG:
        try:
            observer = WAITING_TO_LOG.popleft()
        except IndexError:
            return
        observer.emit_pending()
