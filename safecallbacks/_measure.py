"""Measuring what the consumer of a stream sees, for the demo and ``check``.

Chunks received, the longest gap between two chunks, how the stream ended, total
time; runs bounded by a timeout so a hung handler cannot hang the command; log lines
counted instead of printed. Nothing here runs on the token path: it only observes
streams from the consumer's side.
"""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel

from ._stats import Stats

APIS = ("sync", "async")
API_NAMES = {"sync": ".stream()", "async": ".astream()"}
NOT_RUN = "not run: an earlier bare stream stalled"


# --------------------------------------------------------------------------- measuring


@dataclass
class StreamRun:
    """What the consumer of one stream saw (and, hardened, what the handler's stats say)."""

    total: int
    chunks: int = 0
    error: str | None = None
    longest_gap: float = 0.0
    elapsed: float = 0.0  # to the end of the call (a root run's end may settle)
    to_last_chunk: float = 0.0
    timed_out: bool = False
    loop_lag: float | None = None
    log_lines: int = 0
    stats: Stats | None = None
    flushed: bool | None = None
    started: float = field(default_factory=time.perf_counter, repr=False)
    last_event: float = field(default_factory=time.perf_counter, repr=False)
    last_tick: float | None = field(default=None, repr=False)

    @property
    def died(self) -> bool:
        return self.error is not None

    @property
    def cut_short(self) -> bool:
        return not self.died and self.chunks < self.total

    @property
    def ended(self) -> str:
        if self.timed_out or self.error == NOT_RUN:
            return str(self.error)
        if self.died:
            return f"died: {self.error}"
        return "completed" if self.chunks >= self.total else "ended early, no error"


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}({text!r})" if text else type(exc).__name__


OnChunk = Callable[[int, str, float], None]


def stream_through(
    model: BaseChatModel,
    handler: BaseCallbackHandler | None,
    api: str,
    run: StreamRun,
    on_chunk: OnChunk | None = None,
    probe: bool = False,
    flush_timeout: float | None = None,
) -> StreamRun:
    """Consume one stream of ``model`` with ``handler`` attached, filling ``run``.

    Every exception that ends the stream is recorded (that is what is measured);
    ``probe`` runs the loop-lag ticker beside an async stream; ``flush_timeout``
    flushes a hardened handler after the stream, on the stream's own loop.
    """
    from . import aflush, flush

    config: Any = {"callbacks": [handler] if handler is not None else []}
    run.started = run.last_event = time.perf_counter()

    def seen(content: Any) -> None:
        now = time.perf_counter()
        gap = now - run.last_event
        run.last_event = now
        run.longest_gap = max(run.longest_gap, gap)
        run.to_last_chunk = now - run.started
        run.chunks += 1
        if on_chunk is not None:
            on_chunk(run.chunks, str(content), gap)

    async def consume() -> None:
        # A handler that wrecks the stream's generators makes asyncio log their failed
        # shutdown: that is the stream dying, which is recorded, not a second error.
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        ticker = asyncio.create_task(_tick(run)) if probe else None
        try:
            async for chunk in model.astream("hi", config=config):
                seen(chunk.content)
        finally:
            run.elapsed = time.perf_counter() - run.started
            if ticker is not None:
                ticker.cancel()
        if flush_timeout is not None and handler is not None:
            run.flushed = await aflush(handler, timeout=flush_timeout)

    try:
        if api == "async":
            asyncio.run(consume())
        else:
            try:
                for chunk in model.stream("hi", config=config):
                    seen(chunk.content)
            finally:
                run.elapsed = time.perf_counter() - run.started
            if flush_timeout is not None and handler is not None:
                run.flushed = flush(handler, timeout=flush_timeout)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # what ends a bare stream is the measurement
        run.error = describe(exc)
    return run


async def _tick(run: StreamRun) -> None:
    """Sleep 1 ms in a loop; record the largest lateness (the loop was busy elsewhere)."""
    run.loop_lag = 0.0
    while True:
        run.last_tick = before = time.perf_counter()
        await asyncio.sleep(0.001)
        run.loop_lag = max(run.loop_lag, time.perf_counter() - before - 0.001)


def stream_bounded(
    model: BaseChatModel,
    handler: BaseCallbackHandler | None,
    api: str,
    total: int,
    timeout: float,
    **options: Any,
) -> StreamRun:
    """``stream_through`` in a daemon thread, given up after ``timeout`` seconds.

    A stream still running then is reported as stalled, from a snapshot: the
    thread (and the hung handler in it) is left behind, it cannot hang the caller.
    """
    run = StreamRun(total=total)
    worker = threading.Thread(
        target=stream_through,
        args=(model, handler, api, run),
        kwargs=options,
        name="safecallbacks-check-stream",
        daemon=True,
    )
    worker.start()
    worker.join(timeout + (options.get("flush_timeout") or 0.0))  # the flush has its own
    if not worker.is_alive():
        return run
    ABANDONED.append(worker)
    now = time.perf_counter()
    seen = copy.copy(run)
    seen.timed_out = True
    seen.error = f"stalled: did not finish within {timeout:g} s"
    seen.elapsed = now - seen.started
    seen.longest_gap = max(seen.longest_gap, now - seen.last_event)
    if seen.last_tick is not None:
        seen.loop_lag = max(seen.loop_lag or 0.0, now - seen.last_tick)
    return seen


ABANDONED: list[threading.Thread] = []
"""Stream threads given up on. Their hung hooks may hold executor threads that the
interpreter would join at exit forever: ``python -m safecallbacks`` then exits at once."""


def abandoned_streams() -> bool:
    """True when a stream given up on is still running in this process."""
    return any(thread.is_alive() for thread in ABANDONED)


class LineCounter(io.StringIO):
    """Counts the log lines written to it; forwards them to stderr when asked to."""

    def __init__(self, forward: bool) -> None:
        super().__init__()
        self.forward = forward
        self.lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        if self.forward:
            sys.stderr.write(text)
        return len(text)


class _CountingHandler(logging.Handler):
    def __init__(self, counter: LineCounter) -> None:
        super().__init__(logging.WARNING)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.write(self.format(record) + "\n")


@contextmanager
def counted_logs(show: bool = False) -> Iterator[LineCounter]:
    """Count the log lines LangChain (stdlib logging) and safecallbacks (structlog) write.

    Keeps them off stdout; ``show`` forwards them to stderr as well.
    """
    import structlog

    counter = LineCounter(show)
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=counter))
    lc_logger = logging.getLogger("langchain_core")
    handler = _CountingHandler(counter)
    saved_propagate = lc_logger.propagate
    lc_logger.addHandler(handler)
    lc_logger.propagate = False
    try:
        yield counter
    finally:
        lc_logger.removeHandler(handler)
        lc_logger.propagate = saved_propagate
        structlog.configure(**saved)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:,.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    """Left-aligned columns, two spaces apart; the last column is never padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "".join(indent + line.rstrip() + "\n" for line in lines)


def outcome_counts(stats: Stats) -> str:
    names = ("delivered", "failed", "dropped", "skipped", "pending")
    return f"{stats.emitted} emitted: " + ", ".join(f"{getattr(stats, n)} {n}" for n in names)
