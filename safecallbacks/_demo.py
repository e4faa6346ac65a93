"""``python -m safecallbacks demo``: three misbehaving handlers, bare and then hardened.

A paced fake chat model streams tokens the way a provider does (one every
``--interval`` seconds) through LangChain's normal streaming path. Each handler is
attached bare, then wrapped with :func:`safecallbacks.harden`, and what the consumer of
the stream saw is printed side by side: how many chunks arrived, whether the stream
died (and with what), the longest wait between two chunks. Everything printed is
measured during the run; nothing touches the network.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO, TypeAlias

from langchain_core.callbacks import BaseCallbackHandler

from ._paced import PacedFakeChatModel

Token: TypeAlias = str | list[str | dict[str, Any]]  # what LangChain passes to on_llm_new_token

__all__ = ["DemoConfig", "RunResult", "ScenarioResult", "main", "run_demo", "run_scenario"]

_TEXT = (
    "Callbacks run inside the token stream, so a tracing or logging handler that raises,"
    " hangs or crawls becomes the stream's problem. Hardened handlers only record the"
    " event and return; delivery happens elsewhere, and every outcome is counted."
)
_WORDS = _TEXT.split()


def _demo_tokens(count: int) -> list[str]:
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(count)]


# --------------------------------------------------------------------------- handlers


class FlakyExporter(BaseCallbackHandler):
    """Exports tokens to a tracing backend that goes away mid-stream."""

    raise_error = True

    def __init__(self, fail_from: int) -> None:
        self.fail_from = fail_from
        self.seen = 0

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen >= self.fail_from:
            raise ConnectionError("trace exporter: connection refused")


class CancelledInHandler(BaseCallbackHandler):
    """Lets a ``CancelledError`` from its own I/O escape (raise_error left False)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.at:
            raise asyncio.CancelledError("metrics flush was cancelled")


class StallsOnce(BaseCallbackHandler):
    """Blocks once on a slow write (a full socket buffer, a lock, a DNS lookup)."""

    def __init__(self, at: int, seconds: float) -> None:
        self.at = at
        self.seconds = seconds
        self.seen = 0

    def on_llm_new_token(self, token: Token, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.at:
            time.sleep(self.seconds)


# --------------------------------------------------------------------------- logs


class _LineCounter(io.StringIO):
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
    def __init__(self, counter: _LineCounter) -> None:
        super().__init__(logging.WARNING)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.write(self.format(record) + "\n")


@contextmanager
def _counted_logs(show: bool) -> Iterator[_LineCounter]:
    """Count the log lines LangChain (stdlib logging) and safecallbacks (structlog) write.

    Keeps them off the demo's stdout; ``show`` forwards them to stderr as well.
    """
    import structlog

    counter = _LineCounter(show)
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


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class DemoConfig:
    tokens: int = 40
    interval: float = 0.02
    stall: float = 2.0
    api: str = "sync"  # "sync" -> .stream(), "async" -> .astream()
    show_logs: bool = False  # forward LangChain's and safecallbacks' log lines to stderr

    @property
    def trigger(self) -> int:
        """The token (1-based) on which each handler misbehaves."""
        return max(1, self.tokens // 4)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    make: Callable[[DemoConfig], BaseCallbackHandler]


SCENARIOS: list[Scenario] = [
    Scenario(
        "raises",
        "raises ConnectionError from token {at} on, raise_error=True",
        lambda cfg: FlakyExporter(cfg.trigger),
    ),
    Scenario(
        "cancelled",
        "raises asyncio.CancelledError at token {at} (raise_error=False)",
        lambda cfg: CancelledInHandler(cfg.trigger),
    ),
    Scenario(
        "stalls",
        "blocks {stall:g} s once, at token {at}",
        lambda cfg: StallsOnce(cfg.trigger, cfg.stall),
    ),
]


@dataclass
class RunResult:
    """What the consumer of one stream observed (plus the hardened handler's stats)."""

    chunks: int
    total: int
    error: str | None
    longest_gap: float
    elapsed: float
    stats: Any = None
    flushed: bool | None = None
    log_lines: int = 0

    @property
    def died(self) -> bool:
        return self.error is not None


@dataclass
class ScenarioResult:
    key: str
    title: str
    bare: RunResult
    hardened: RunResult


class _Progress:
    """A ``\\r``-updated line on a terminal; one plain line per stream otherwise."""

    def __init__(self, out: TextIO, label: str, total: int) -> None:
        self.out = out
        self.label = label
        self.total = total
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.text = ""
        self.last = 0.0

    def update(self, chunks: int, token: str, gap: float) -> None:
        if not self.tty:
            return
        self.text = (self.text + token)[-28:]
        now = time.perf_counter()
        if chunks < self.total and now - self.last < 0.03 and gap < 0.1:
            return
        self.last = now
        width = 20
        filled = width * chunks // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        line = f"  {self.label:<9} [{bar}] {chunks:>4}/{self.total}  {self.text!r:<32}"
        self.out.write("\r" + line)
        self.out.flush()

    def done(self, result: RunResult) -> None:
        outcome = f"died: {result.error}" if result.error else "completed"
        summary = (
            f"  {self.label:<9} {result.chunks}/{result.total} chunks, {outcome}, "
            f"longest gap {_fmt_s(result.longest_gap)}"
        )
        if self.tty:
            self.out.write("\r" + summary.ljust(80) + "\n")
        else:
            self.out.write(summary + "\n")
        self.out.flush()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}({text!r})" if text else type(exc).__name__


def _stream(model: PacedFakeChatModel, handler: Any, api: str, progress: _Progress) -> RunResult:
    chunks = 0
    longest = 0.0
    error: str | None = None
    config: Any = {"callbacks": [handler]}
    start = prev = time.perf_counter()

    def seen(content: Any) -> None:
        nonlocal chunks, longest, prev
        now = time.perf_counter()
        gap = now - prev
        longest = max(longest, gap)
        prev = now
        chunks += 1
        progress.update(chunks, str(content), gap)

    try:
        if api == "async":

            async def consume() -> None:
                async for chunk in model.astream("hi", config=config):
                    seen(chunk.content)

            asyncio.run(consume())
        else:
            for chunk in model.stream("hi", config=config):
                seen(chunk.content)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # the point of the demo: what kills a bare stream
        error = _describe(exc)
    return RunResult(
        chunks=chunks,
        total=len(model.tokens),
        error=error,
        longest_gap=longest,
        elapsed=time.perf_counter() - start,
    )


def run_scenario(scenario: Scenario, cfg: DemoConfig, out: TextIO | None = None) -> ScenarioResult:
    """Stream once with the handler bare, once hardened; return both observations."""
    from . import close, flush, harden, stats

    sink = out if out is not None else sys.stdout
    model = PacedFakeChatModel(tokens=_demo_tokens(cfg.tokens), interval=cfg.interval)

    with _counted_logs(cfg.show_logs) as logs:
        progress = _Progress(sink, "bare", cfg.tokens)
        bare = _stream(model, scenario.make(cfg), cfg.api, progress)
        bare.log_lines = logs.lines
        progress.done(bare)

    with _counted_logs(cfg.show_logs) as logs:
        safe = harden(scenario.make(cfg), name=scenario.key)
        progress = _Progress(sink, "hardened", cfg.tokens)
        hardened = _stream(model, safe, cfg.api, progress)
        hardened.flushed = flush(safe, timeout=cfg.stall + 5.0)
        hardened.stats = stats(safe)
        close(safe, timeout=1.0)
        hardened.log_lines = logs.lines
        progress.done(hardened)
    return ScenarioResult(scenario.key, _title(scenario, cfg), bare, hardened)


def _title(scenario: Scenario, cfg: DemoConfig) -> str:
    return scenario.title.format(at=cfg.trigger, stall=cfg.stall)


def run_demo(
    cfg: DemoConfig, out: TextIO | None = None, only: list[str] | None = None
) -> list[ScenarioResult]:
    """Run every scenario (or those named in ``only``) and print the comparison."""
    sink = out if out is not None else sys.stdout
    api = ".astream()" if cfg.api == "async" else ".stream()"
    sink.write(
        f"safecallbacks demo: a fake model streams {cfg.tokens} tokens, one every "
        f"{cfg.interval * 1e3:g} ms, via {api}.\nEach handler is attached bare, then "
        "hardened with safecallbacks.harden(); everything below is measured in this run.\n"
    )
    results: list[ScenarioResult] = []
    chosen = [s for s in SCENARIOS if not only or s.key in only]
    for number, scenario in enumerate(chosen, 1):
        sink.write(f"\n[{number}/{len(chosen)}] handler {_title(scenario, cfg)}\n")
        sink.flush()
        result = run_scenario(scenario, cfg, sink)
        results.append(result)
        sink.write(_side_by_side(result))
        sink.flush()
    sink.write("\n" + _summary(results))
    sink.flush()
    return results


# --------------------------------------------------------------------------- printing


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _stream_cell(run: RunResult) -> str:
    return f"died: {run.error}" if run.error else "completed"


def _stats_text(stats: Any) -> str:
    if stats is None:
        return "-"
    fields = ("emitted", "delivered", "failed", "dropped", "skipped", "pending")
    return ", ".join(f"{name} {getattr(stats, name)}" for name in fields)


def _side_by_side(result: ScenarioResult) -> str:
    rows = [
        ("", "bare", "hardened"),
        (
            "chunks received",
            f"{result.bare.chunks} of {result.bare.total}",
            f"{result.hardened.chunks} of {result.hardened.total}",
        ),
        ("stream", _stream_cell(result.bare), _stream_cell(result.hardened)),
        ("longest gap", _fmt_s(result.bare.longest_gap), _fmt_s(result.hardened.longest_gap)),
        ("stream time", _fmt_s(result.bare.elapsed), _fmt_s(result.hardened.elapsed)),
        ("log lines", str(result.bare.log_lines), str(result.hardened.log_lines)),
    ]
    first = max(len(r[0]) for r in rows)
    second = max(len(r[1]) for r in rows)
    lines = [f"  {a:<{first}}   {b:<{second}}   {c}".rstrip() for a, b, c in rows]
    flushed = "" if result.hardened.flushed else " (flush timed out)"
    lines.append(f"  hardened stats(): {_stats_text(result.hardened.stats)}{flushed}")
    return "\n".join(lines) + "\n"


def _summary(results: list[ScenarioResult]) -> str:
    header = ("handler", "bare", "hardened", "longest gap bare / hardened")
    rows = [header]
    for r in results:
        rows.append(
            (
                r.key,
                f"{r.bare.chunks}/{r.bare.total} " + ("died" if r.bare.died else "ok"),
                f"{r.hardened.chunks}/{r.hardened.total} " + ("died" if r.hardened.died else "ok"),
                f"{_fmt_s(r.bare.longest_gap)} / {_fmt_s(r.hardened.longest_gap)}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["Summary (chunks received, stream outcome):"]
    for row in rows:
        lines.append("  " + "   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
    return "\n".join(line.rstrip() for line in lines) + "\n"


# --------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _token_count(text: str) -> int:
    value = int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"must be >= 4, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safecallbacks",
        description="safecallbacks command-line tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="stream through misbehaving handlers, bare vs hardened",
        description=(
            "Stream a paced fake chat model (no network) through three misbehaving "
            "callback handlers: one raising with raise_error=True, one raising "
            "asyncio.CancelledError, one stalling once. Each runs bare, then hardened "
            "with safecallbacks.harden(); the chunks the consumer received, whether the "
            "stream died, the longest gap between chunks and the hardened handler's "
            "stats() are printed side by side. Takes under 10 s with the defaults."
        ),
    )
    demo.add_argument(
        "--tokens", type=_token_count, default=40, help="tokens per stream (default: 40)"
    )
    demo.add_argument(
        "--interval",
        type=_positive_float,
        default=0.02,
        help="seconds between tokens, like a provider's pace (default: 0.02)",
    )
    demo.add_argument(
        "--stall",
        type=_positive_float,
        default=2.0,
        help="how long the stalling handler blocks, in seconds (default: 2)",
    )
    demo.add_argument(
        "--api",
        choices=("sync", "async"),
        default="sync",
        help="consume with .stream() (sync, default) or .astream() (async)",
    )
    demo.add_argument(
        "--show-logs",
        action="store_true",
        help="also print the log lines LangChain and safecallbacks write (to stderr); "
        "by default they are only counted",
    )
    demo.add_argument(
        "--only",
        nargs="+",
        choices=[s.key for s in SCENARIOS],
        metavar="HANDLER",
        help="run only these handlers: " + ", ".join(s.key for s in SCENARIOS),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m safecallbacks``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 2
    cfg = DemoConfig(
        tokens=args.tokens,
        interval=args.interval,
        stall=args.stall,
        api=args.api,
        show_logs=args.show_logs,
    )
    results = run_demo(cfg, only=args.only)
    intact = all(r.hardened.chunks == r.hardened.total and not r.hardened.died for r in results)
    if not intact:
        print("\nA hardened stream did not deliver every chunk: please report this.")
    return 0 if intact else 1
