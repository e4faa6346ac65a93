"""Process-wide state: the live engines, the bounded drain at exit, and fork.

Every engine registers here (weakly) so that interpreter exit can give pending
events a bounded time and count the rest as dropped, and so that a forked
child starts each engine with fresh lanes and counters. Each module that owns
process-wide state (the worker pool, the background loop, locks) resets its
own after a fork; this one resets the registry and the engines. Nothing here
runs on the token path.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

from ._logs import logger
from ._metrics import register_depth_source
from ._observe import Observer, write_waiting_logs
from ._options import Options
from ._queue import Barrier, Lane
from ._stats import Stats
from ._workers import keep_watching_while

_now = time.monotonic


class Live(Protocol):
    """What exit and fork need from a live engine."""

    name: str
    options: Options
    observer: Observer
    closed: bool

    def place_barriers(self, busy_only: bool = False) -> list[tuple[Lane, Barrier]]: ...

    def queue_depth(self) -> int: ...

    def stats(self) -> Stats: ...

    def shut(self, reason: str) -> None: ...

    def reset_after_fork(self) -> None: ...


class _Registry:
    """The engines alive in this process (weakly held: a dropped handler is forgotten)."""

    def __init__(self) -> None:
        self._items: weakref.WeakSet[Live] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, item: Live) -> None:
        with self._lock:
            self._items.add(item)

    def discard(self, item: Live) -> None:
        with self._lock:
            self._items.discard(item)

    def __iter__(self) -> Iterator[Live]:
        with self._lock:
            return iter(list(self._items))

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        for engine in list(self._items):
            engine.reset_after_fork()


registry = _Registry()


def _depths() -> Iterable[tuple[str, int]]:
    for engine in registry:
        yield engine.name, engine.queue_depth()


register_depth_source(_depths)


def _offloaded_sync_handler_alive() -> bool:
    """Whether the pool's watchdog must stay: a live handler may hand it work."""
    return any(engine.options.mode == "offload" and not engine.closed for engine in registry)


keep_watching_while(_offloaded_sync_handler_alive)


def drain_at_exit() -> None:
    """Give pending events a bounded time at interpreter exit, then count the rest dropped."""
    engines = list(registry)
    # Idle lanes need no barrier: kicking one could try to start a thread, which the
    # interpreter refuses at shutdown (3.12 and newer).
    placed = [(engine, engine.place_barriers(busy_only=True)) for engine in engines]
    started = _now()
    lost: dict[str, int] = {}
    for engine, barriers in placed:
        deadline = started + engine.options.exit_timeout
        for _, barrier in barriers:
            if not barrier.wait(deadline - _now()):
                break
        engine.observer.summarise()
        before = engine.stats().dropped
        engine.shut(reason="exit")
        after = engine.stats().dropped
        if after > before:
            lost[engine.name] = lost.get(engine.name, 0) + after - before
    write_waiting_logs()  # closed handlers' lines too: they are no longer registered
    if lost:
        # One line for the whole process, however many handlers were still busy.
        logger().warning("events_dropped_at_exit", handlers=lost, total=sum(lost.values()))


atexit.register(drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=registry.reset_after_fork)
