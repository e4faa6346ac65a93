"""Request scopes: which runs belong to a request, their flush and their stats.

A run belongs to the scope its start was emitted in (a context variable, so
threads and tasks started inside inherit it); the runs under it follow it. The
engine routes a scope's runs to strands of their own, which is what lets a
scope's flush wait for those strands only, never behind other requests'
backlogs. Each such strand counts what was routed to it and what became of it;
a scope's ``stats()`` adds up its strands, live and retired.

Two scopes open at the same time are two requests in progress: bare, their
runs call a shared handler side by side, so a new run of one never waits for
the earlier runs of the other to be delivered (see ``Router`` gates).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import Token
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._compat import get_running_loop
from ._logs import logger
from ._queue import Barrier, Lane, await_settled, wait_settled
from ._runs import CURRENT_SCOPE as _current
from ._stats import Estimator, HookStats, Stats

if TYPE_CHECKING:
    from ._observe import Batch
    from ._runs import Strand

P = ParamSpec("P")
R = TypeVar("R")

_DELIVERED, _FAILED, _DROPPED, _SKIPPED = range(4)


class Scope:
    """The runs started inside one ``with``/``async with safecallbacks.scope()`` block.

    ``flush``/``aflush`` wait for every hardened handler's events of those runs
    (and of scopes opened inside this one), never for other runs' events.
    ``stats`` is a ``Stats`` of the same events across handlers. A scope can be
    flushed and read after its block ends; it can be entered once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.parent: Scope | None = None
        self.root: Scope = self  # the outermost scope: scopes under one root are one request
        self.open = False
        self._entered = False
        self._token: Token[Any] | None = None
        self._children: list[Scope] = []
        self._engines: set[Any] = set()  # engines that saw a run start here
        self._strands: set[Strand] = set()  # live strands holding this scope's events
        self._emitted: dict[str, int] = {}  # of retired strands and events never routed
        self._rows: dict[str, list[int]] = {}  # delivered, failed, dropped, skipped per hook
        self._errors: dict[str, int] = {}
        self._duration = Estimator()
        self._lag = Estimator()

    def __repr__(self) -> str:
        state = "open" if self.open else "entered" if self._entered else "new"
        return f"<safecallbacks.Scope {state}>"

    # --- entering and leaving ------------------------------------------------------

    def __enter__(self) -> Scope:
        if self._entered:
            raise RuntimeError("safecallbacks: a scope can be entered once; make a new scope()")
        self._entered = True
        parent = _current.get()
        if parent is not None:
            self.parent, self.root = parent, parent.root
            with parent._lock:
                parent._children.append(self)
        self._token = _current.set(self)
        self.open = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.open = False
        token, self._token = self._token, None
        if token is None:
            return
        try:
            _current.reset(token)
        except ValueError:  # left in another context than it was entered in
            _current.set(self.parent)

    async def __aenter__(self) -> Scope:
        return self.__enter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(kind, value, traceback)

    # --- what the engine tells it (never on the token path) -----------------------

    def saw(self, engine: Any) -> None:
        """``engine`` routes a run of this scope (called at each run start)."""
        if engine not in self._engines:
            with self._lock:
                self._engines.add(engine)

    def attach(self, strand: Strand) -> None:
        with self._lock:
            self._strands.add(strand)

    def retire(self, strand: Strand) -> None:
        """``strand`` is done and goes: what it routed and dropped stays counted here."""
        with self._lock:
            self._strands.discard(strand)
            _add_counts(self._emitted, strand.routed or {})
            for hook, count in (strand.dropped or {}).items():
                self._row(hook)[_DROPPED] += count

    def absorb(self, batch: Batch) -> None:
        """A consumer committed a batch of this scope's deliveries."""
        outcomes = batch.outcomes()
        with self._lock:
            for hook, count in batch.skipped.items():
                self._row(hook)[_SKIPPED] += count
            for (hook, error_name), count in outcomes.items():
                if error_name is None:
                    self._row(hook)[_DELIVERED] += count
                else:
                    self._row(hook)[_FAILED] += count
                    self._errors[error_name] = self._errors.get(error_name, 0) + count
            self._duration.add_many(batch.durations)
            self._lag.add_many(batch.lags)

    def dropped_unrouted(self, hook: str, count: int = 1) -> None:
        """Events of this scope dropped before they reached a strand."""
        with self._lock:
            self._emitted[hook] = self._emitted.get(hook, 0) + count
            self._row(hook)[_DROPPED] += count

    def _row(self, hook: str) -> list[int]:
        row = self._rows.get(hook)
        if row is None:
            row = self._rows[hook] = [0, 0, 0, 0]
        return row

    # --- flush ---------------------------------------------------------------------

    def family(self) -> list[Scope]:
        """This scope and every scope opened inside it."""
        found, todo = [], [self]
        while todo:
            scope = todo.pop()
            found.append(scope)
            with scope._lock:
                todo.extend(scope._children)
        return found

    def _place_barriers(self) -> list[tuple[Lane, Barrier]]:
        scopes = self.family()
        wanted = frozenset(scopes)
        engines: set[Any] = set()
        for scope in scopes:
            with scope._lock:
                engines.update(scope._engines)
        placed = []
        for engine in engines:
            for lane in engine.lanes():
                if lane.scheduled or lane.queue or not lane.router.idle():
                    barrier = Barrier(scopes=wanted)
                    lane.put_barrier(barrier)
                    placed.append((lane, barrier))
        return placed

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event of this scope's runs so far is settled; False on timeout."""
        check_timeout(timeout)
        if get_running_loop() is not None:
            raise RuntimeError(
                "safecallbacks: a blocking scope.flush() was called inside a running event "
                "loop, where it would block the loop it waits for; use "
                "`await scope.aflush()` instead"
            )
        deadline = _monotonic() + timeout
        ok = True
        for lane, barrier in self._place_barriers():
            ok = wait_settled(lane, barrier, deadline) and ok
        return ok

    async def aflush(self, timeout: float = 5.0) -> bool:
        """``flush`` for async code: waits without blocking the event loop."""
        check_timeout(timeout)
        placed = self._place_barriers()
        if not placed:
            return True
        return await await_settled(placed, timeout)

    # --- stats ---------------------------------------------------------------------

    def stats(self) -> Stats:
        """What became of this scope's events (and its inner scopes'), across handlers.

        ``emitted == delivered + failed + dropped + skipped + pending`` holds in
        every snapshot: outcomes are read first, what was emitted last.
        """
        rows: dict[str, list[int]] = {}
        errors: dict[str, int] = {}
        duration, lag = Estimator(), Estimator()
        scopes = self.family()
        _route_queued(scopes)
        for scope in scopes:
            scope._read_outcomes(rows, errors, duration, lag)
        emitted: dict[str, int] = {}
        for scope in scopes:
            scope._read_emitted(emitted)
        hooks = {}
        for hook in set(rows) | set(emitted):
            row = rows.get(hook, [0, 0, 0, 0])
            pending = max(emitted.get(hook, 0) - sum(row), 0)
            hooks[hook] = HookStats(
                emitted=sum(row) + pending,
                delivered=row[_DELIVERED],
                failed=row[_FAILED],
                dropped=row[_DROPPED],
                skipped=row[_SKIPPED],
                pending=pending,
            )
        total = [sum(h[i] for h in rows.values()) for i in range(4)]
        pending = sum(h.pending for h in hooks.values())
        return Stats(
            handler="scope",
            mode="scope",
            emitted=sum(total) + pending,
            delivered=total[_DELIVERED],
            failed=total[_FAILED],
            dropped=total[_DROPPED],
            skipped=total[_SKIPPED],
            pending=pending,
            hooks=MappingProxyType(hooks),
            errors=MappingProxyType(errors),
            handler_time=duration.summary(),
            lag=lag.summary(),
            mode_reason="the events of one scope, across handlers",
        )

    def _read_outcomes(
        self,
        rows: dict[str, list[int]],
        errors: dict[str, int],
        duration: Estimator,
        lag: Estimator,
    ) -> None:
        with self._lock:
            for hook, row in self._rows.items():
                into = rows.setdefault(hook, [0, 0, 0, 0])
                for column, value in enumerate(row):
                    into[column] += value
            for name, count in self._errors.items():
                errors[name] = errors.get(name, 0) + count
            duration.merge(self._duration)
            lag.merge(self._lag)
            live = list(self._strands)
        for strand in live:  # delivered, not committed yet; dropped, not retired yet
            batch = strand.batch
            for hook, count in _copied(batch.skipped).items():
                rows.setdefault(hook, [0, 0, 0, 0])[_SKIPPED] += count
            for (hook, error_name), count in batch.outcomes().items():
                into = rows.setdefault(hook, [0, 0, 0, 0])
                into[_DELIVERED if error_name is None else _FAILED] += count
                if error_name is not None:
                    errors[error_name] = errors.get(error_name, 0) + count
            for hook, count in _copied(strand.dropped or {}).items():
                rows.setdefault(hook, [0, 0, 0, 0])[_DROPPED] += count

    def _read_emitted(self, into: dict[str, int]) -> None:
        with self._lock:  # retirement moves counts under this lock: none is missed
            _add_counts(into, self._emitted)
            for strand in self._strands:
                _add_counts(into, _copied(strand.routed or {}))


def _route_queued(scopes: list[Scope]) -> None:
    """Route what the scopes' lanes hold unrouted (their consumers may be busy for long),
    so that a snapshot counts every event emitted so far, not only the routed ones."""
    engines: set[Any] = set()
    for scope in scopes:
        with scope._lock:
            engines.update(scope._engines)
    for engine in engines:
        for lane in engine.lanes():
            if lane.queue:
                with lane.router.lock:
                    lane.router.pump()


def _add_counts(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for hook, count in counts.items():
        into[hook] = into.get(hook, 0) + count


def _copied(counts: Mapping[str, int]) -> dict[str, int]:
    while True:
        try:
            return dict(counts)
        except RuntimeError:  # a consumer added a hook meanwhile; read again
            continue


def check_timeout(timeout: float, name: str = "timeout") -> None:
    """Refuse a timeout that is not a number of seconds >= 0, naming the argument."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"safecallbacks: {name} must be a number of seconds, got {timeout!r}")
    if not timeout >= 0:  # also refuses NaN
        raise ValueError(f"safecallbacks: {name} must be >= 0 seconds, got {timeout!r}")


_monotonic = time.monotonic


def scope() -> Scope:
    """A new request scope: ``with scope() as s:`` or ``async with scope() as s:``."""
    return Scope()


def report_unsettled(found: Scope, timeout: float, where: str) -> None:
    """One log line for a scope whose flush timed out: what was left, per hook."""
    snapshot = found.stats()
    left = {hook: row.pending for hook, row in snapshot.hooks.items() if row.pending}
    logger().warning(
        "scope_flush_timed_out",
        where=where,
        pending=snapshot.pending,
        pending_by_hook=left,
        timeout_s=round(timeout, 3),
    )


def flush_or_report(found: Scope, timeout: float, where: str) -> bool:
    """Flush a scope a function or request ran in, logging once what it could not settle."""
    if get_running_loop() is not None:
        # A sync function called on a loop's thread: blocking here would stall the loop
        # (and its async handlers could never deliver). Said once, not waited for.
        logger().warning("scope_flush_skipped", where=where, reason="inside a running loop")
        return False
    ok = found.flush(timeout)
    if not ok:
        report_unsettled(found, timeout, where)
    return ok


async def aflush_or_report(found: Scope, timeout: float, where: str) -> bool:
    ok = await found.aflush(timeout)
    if not ok:
        report_unsettled(found, timeout, where)
    return ok


@overload
def scoped(
    function: Callable[P, Awaitable[R]], *, flush_timeout: float = ...
) -> Callable[P, Awaitable[R]]: ...
@overload
def scoped(function: Callable[P, R], *, flush_timeout: float = ...) -> Callable[P, R]: ...
@overload
def scoped(
    function: None = None, *, flush_timeout: float = ...
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def scoped(function: Any = None, *, flush_timeout: float = 2.0) -> Any:
    """Run a function (sync or async) in a scope of its own, flushed before it returns.

    For a Celery task or a serverless handler: when the call returns, every
    event of the runs it started has been delivered, or ``flush_timeout`` has
    passed (then one log line says what was left). Usable bare (``@scoped``)
    or with options (``@scoped(flush_timeout=5.0)``).
    """
    check_timeout(flush_timeout, "flush_timeout")
    if function is None:
        return functools.partial(scoped, flush_timeout=flush_timeout)
    if not callable(function):
        raise TypeError(f"safecallbacks: @scoped needs a function, got {function!r}")
    where = getattr(function, "__qualname__", repr(function))
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def run_scoped_async(*args: Any, **kwargs: Any) -> Any:
            with Scope() as found:
                try:
                    return await function(*args, **kwargs)
                finally:
                    await aflush_or_report(found, flush_timeout, where)

        return run_scoped_async

    @functools.wraps(function)
    def run_scoped(*args: Any, **kwargs: Any) -> Any:
        with Scope() as found:
            try:
                return function(*args, **kwargs)
            finally:
                flush_or_report(found, flush_timeout, where)

    return run_scoped
