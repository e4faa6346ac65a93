"""Shared pieces of the benchmark scripts: handlers, statistics, tables, plumbing.

Not a benchmark itself. Every script in this folder imports it from its own directory
(``python benchmarks/<name>.py`` puts the folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextvars
import logging
import math
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from safecallbacks._demo import StallsOnce

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

Token = str | list[str | dict[str, Any]]  # what LangChain passes to on_llm_new_token

_DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


# --------------------------------------------------------------------------- library


def load_library() -> ModuleType | None:
    """Import safecallbacks, or return None while the core does not exist yet."""
    try:
        import safecallbacks
    except Exception as exc:  # ImportError, or a half-written core
        print(
            f"note: safecallbacks not importable ({exc!r}); hardened rows skipped", file=sys.stderr
        )
        return None
    if not hasattr(safecallbacks, "harden"):
        return None
    return safecallbacks


def quiet_logs(show: bool = False) -> None:
    """Send stdlib logging and structlog output to /dev/null (or stderr with ``show``).

    The bare always-failing handler makes LangChain log one WARNING per token. Writing
    the lines somewhere keeps that cost in the measurement; writing them to a terminal
    would drown the tables. stdout is reserved for the Markdown.
    """
    target = sys.stderr if show else _DEVNULL
    logging.basicConfig(stream=target, level=logging.WARNING, force=True)
    try:
        import structlog
    except ImportError:
        return
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=target))


# --------------------------------------------------------------------------- handlers


def burn_cpu(loops: int) -> int:
    """Pure-Python busy work that holds the GIL (no C call releases it)."""
    acc = 0
    for i in range(loops):
        acc = (acc * 31 + i) % 1_000_003
    return acc


class NoOp(BaseCallbackHandler):
    """Plain sync handler: LangChain runs it in an executor thread in async streams."""

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        return None


class NoOpInline(NoOp):
    """The cheapest possible handler: sync, ``run_inline = True``."""

    run_inline = True


class Sleeper(BaseCallbackHandler):
    """Blocking I/O stand-in: sleeps on every token."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        time.sleep(self.seconds)


class Failing(BaseCallbackHandler):
    """Raises on every token; ``raise_error`` left at LangChain's default (False)."""

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        raise RuntimeError("handler bug")


# Blocks for ``seconds`` on token number ``at`` (once), free otherwise: the demo's handler.
HangOnce = StallsOnce


class AsyncNoOp(AsyncCallbackHandler):
    async def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        return None


class AsyncSleeper(AsyncCallbackHandler):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        await asyncio.sleep(self.seconds)


class CpuHeavy(BaseCallbackHandler):
    """Pure-Python work on every token (no I/O, holds the GIL throughout)."""

    def __init__(self, loops: int) -> None:
        self.loops = loops

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        burn_cpu(self.loops)


class Stuck(BaseCallbackHandler):
    """Blocks on ``release`` forever (until someone sets it)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.release.wait()


class Gated(BaseCallbackHandler):
    """A no-op that waits while its gate is closed: lets a benchmark hold delivery back."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.gate.wait()


# --------------------------------------------------------------------------- do it yourself
#
# What people write instead of a library: hand the event to another thread from the hook.
# Both wrap the same inner handler a hardened handler would wrap, so the "work" delivered
# on the other thread is identical. Neither bounds its queue, isolates failures beyond
# swallowing them, or keeps a hung handler from piling up events: they are here for their
# cost per event, not as equivalents.


def _nothing() -> None:
    return None


class ExecutorPerEvent(BaseCallbackHandler):
    """``executor.submit`` per event on a one-thread pool (what many tracing SDKs do)."""

    run_inline = True

    def __init__(self, inner: BaseCallbackHandler) -> None:
        self.inner = inner
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="diy-submit"
        )

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.pool.submit(self.inner.on_llm_new_token, token, **kwargs)

    def drain(self, timeout: float = 30.0) -> bool:
        """One worker, FIFO: once a marker submitted now has run, every earlier event has."""
        try:
            self.pool.submit(_nothing).result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class QueuePattern(BaseCallbackHandler):
    """The stdlib logging QueueHandler/QueueListener pattern: put_nowait, one drain thread."""

    run_inline = True

    def __init__(self, inner: BaseCallbackHandler) -> None:
        self.inner = inner
        self.q: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._listen, name="diy-queue", daemon=True)
        self.thread.start()

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.q.put_nowait((token, kwargs))

    def _listen(self) -> None:
        work = self.inner.on_llm_new_token
        get = self.q.get
        while True:
            item = get()
            if type(item) is tuple:
                token, kwargs = item
                try:  # noqa: SIM105 - cheaper per event than contextlib.suppress
                    work(token, **kwargs)
                except Exception:  # what a listener does with a failing handler: go on
                    pass
            elif item is None:
                return
            else:  # a drain marker
                item.set()

    def drain(self, timeout: float = 30.0) -> bool:
        done = threading.Event()
        self.q.put_nowait(done)
        return done.wait(timeout)

    def shutdown(self) -> None:
        self.q.put_nowait(None)


class MinimalOffload(BaseCallbackHandler):
    """The floor of offloading: the hook appends the event and a copy of its context to a
    deque; one thread polls it while there is traffic (as hardened lanes do, going idle
    after 50 ms without any) and calls the handler in that context. No bound, no
    isolation, no accounting: what moving the call to another thread costs, alone."""

    run_inline = True
    POLL = 0.002
    LINGER = 0.05

    def __init__(self, inner: BaseCallbackHandler) -> None:
        self.inner = inner
        self.q: collections.deque[Any] = collections.deque()
        self.idle = False
        self.wake = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._poll, name="diy-minimal", daemon=True)
        self.thread.start()

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.q.append((token, kwargs, contextvars.copy_context()))
        if self.idle:
            self.wake.set()

    def _poll(self) -> None:
        work = self.inner.on_llm_new_token
        pop = self.q.popleft
        quiet_since: float | None = None
        while not self.stop:
            try:
                item = pop()
            except IndexError:
                now = time.monotonic()
                quiet_since = now if quiet_since is None else quiet_since
                if now - quiet_since < self.LINGER:
                    time.sleep(self.POLL)
                    continue
                self.idle = True
                if not self.q:  # checked after raising the flag: no wake-up is lost
                    self.wake.wait()
                self.wake.clear()
                self.idle = False
                quiet_since = None
                continue
            quiet_since = None
            if type(item) is tuple:
                token, kwargs, context = item
                try:  # noqa: SIM105 - cheaper per event than contextlib.suppress
                    context.run(work, token, **kwargs)
                except Exception:
                    pass
            else:  # a drain marker
                item.set()

    def drain(self, timeout: float = 30.0) -> bool:
        done = threading.Event()
        self.q.append(done)
        if self.idle:
            self.wake.set()
        return done.wait(timeout)

    def shutdown(self) -> None:
        self.stop = True
        self.wake.set()


DIY = (ExecutorPerEvent, QueuePattern, MinimalOffload)


def cpu_loops_for(seconds: float) -> int:
    """Calibrate ``burn_cpu`` so that one call takes about ``seconds``."""
    loops = 10_000
    while True:
        t0 = time.perf_counter()
        burn_cpu(loops)
        took = time.perf_counter() - t0
        if took > 0.02:
            return max(1, int(loops * seconds / took))
        loops *= 2


# --------------------------------------------------------------------------- hardening


@dataclass
class Settled:
    """What a hardened handler reported after the run (None fields when bare)."""

    flushed: bool | None = None
    stats: Any = None
    flush_ms: float | None = None
    close_ms: float | None = None
    after: str | None = None
    cpu_done_ns: int | None = None  # time.process_time_ns() once flushed (or drained)

    def summary(self) -> str:
        if self.stats is None:
            if self.flushed is None:
                return "-"
            return "drained" if self.flushed else "drain timed out"
        s = self.stats
        parts = [f"del {s.delivered}"]
        for label, value in (
            ("fail", s.failed),
            ("skip", s.skipped),
            ("drop", s.dropped),
            ("pend", s.pending),
        ):
            if value:
                parts.append(f"{label} {value}")
        if not self.flushed:
            parts.append("flush timed out")
        if self.after:
            parts.append(self.after)
        return ", ".join(parts)


def settle(hardened: Any, timeout: float = 10.0, close: bool = True) -> Settled:
    """Flush a hardened handler (untimed by the caller), snapshot stats, close it."""
    if hardened is None:
        return Settled()
    t0 = time.perf_counter()
    ok = bool(hardened.flush(timeout=timeout))
    cpu_done = time.process_time_ns()
    took = (time.perf_counter() - t0) * 1e3
    stats = hardened.stats()
    if close:
        hardened.close(timeout=0.5)
    return Settled(flushed=ok, stats=stats, flush_ms=took, cpu_done_ns=cpu_done)


def settle_diy(handler: Any, timeout: float = 10.0) -> Settled:
    """``settle`` for a do-it-yourself wrapper: wait until its thread has drained, stop it."""
    t0 = time.perf_counter()
    ok = handler.drain(timeout)
    cpu_done = time.process_time_ns()
    took = (time.perf_counter() - t0) * 1e3
    handler.shutdown()
    return Settled(flushed=ok, flush_ms=took, cpu_done_ns=cpu_done)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    data = [v for v in values if not math.isnan(v)]
    return statistics.median(data) if data else math.nan


@dataclass
class StreamRun:
    """One consumer-side measurement of a stream."""

    total_ns: int
    gaps_ns: list[int]
    chunks: int
    error: str | None = None
    settled: Settled = field(default_factory=Settled)
    cpu_start_ns: int = 0  # time.process_time_ns() when the stream was started
    cpu_ns: int | None = None  # process CPU (all threads) until the end of delivery

    def cpu_us_per_chunk(self) -> float:
        if self.cpu_ns is None or not self.chunks:
            return math.nan
        return self.cpu_ns / self.chunks / 1e3

    def gap_ms(self, q: float) -> float:
        return percentile(self.gaps_ns, q) / 1e6 if self.gaps_ns else math.nan

    @property
    def max_gap_ms(self) -> float:
        return max(self.gaps_ns) / 1e6 if self.gaps_ns else math.nan


# --------------------------------------------------------------------------- formatting


def fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}x"


def fmt_num(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def shown(value: float) -> float:
    """The ratio as the tables print it (2 decimals): verdicts agree with what is shown."""
    return round(value, 2)


def ratio(value: float, base: float) -> float:
    if math.isnan(value) or math.isnan(base) or base <= 0:
        return math.nan
    return value / base


def md_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """A GitHub Markdown table; columns listed in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    sep = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(headers), "| " + " | ".join(sep) + " |", *(line(r) for r in rows)])


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "met" if ok else "MISSED"


def environment_line() -> str:
    import langchain_core

    return (
        f"python {platform.python_version()}, langchain-core {langchain_core.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"
    )


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test sizes (a few seconds); numbers are noisy"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats per configuration (medians are reported)"
    )
    parser.add_argument(
        "--show-logs",
        action="store_true",
        help="print handler/LangChain log lines to stderr instead of discarding",
    )
    return parser
