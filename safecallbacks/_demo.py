"""``python -m safecallbacks demo``: three misbehaving handlers, bare and then hardened.

Its one job is the demo: a paced fake chat model streams tokens the way a provider
does (one every ``--interval`` seconds) through LangChain's normal streaming path.
Each handler is attached bare, then wrapped with :func:`safecallbacks.harden`, and one
table per handler shows what the consumer of each stream saw (chunks, how the stream
ended, the longest wait between two chunks, the total time) and what the hardened
handler's stats counted. Everything printed is measured during the run (with the
stream-measuring helpers of ``_check``); nothing touches the network. None of it
runs on the token path.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO, TypeAlias

from langchain_core.callbacks import BaseCallbackHandler

from ._measure import (
    API_NAMES,
    StreamRun,
    counted_logs,
    fmt_s,
    outcome_counts,
    stream_through,
    table,
)
from ._options import Breaker
from ._paced import PacedFakeChatModel

Token: TypeAlias = str | list[str | dict[str, Any]]  # what LangChain passes to on_llm_new_token

__all__ = ["SCENARIOS", "DemoConfig", "RunResult", "ScenarioResult", "run_demo", "run_scenario"]

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


RunResult = StreamRun  # what the consumer of one stream saw, plus hardened stats


@dataclass
class ScenarioResult:
    key: str
    title: str
    bare: RunResult
    hardened: RunResult
    breaker: Breaker | None = None  # the hardened handler's breaker settings


class _Progress:
    """A ``\\r``-updated progress line on a terminal, erased when the stream ends.

    Off a terminal it writes nothing: the table after each scenario says it all.
    """

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

    def clear(self) -> None:
        if self.tty:
            self.out.write("\r" + " " * 80 + "\r")
            self.out.flush()


def _observe(
    model: PacedFakeChatModel,
    handler: BaseCallbackHandler,
    label: str,
    cfg: DemoConfig,
    sink: TextIO,
) -> RunResult:
    """One stream with ``handler`` attached; a hardened one is flushed and its stats read."""
    from . import close, stats
    from ._hardened import _Hardened

    hardened = isinstance(handler, _Hardened)
    progress = _Progress(sink, label, cfg.tokens)
    with counted_logs(cfg.show_logs) as logs:
        run = stream_through(
            model,
            handler,
            cfg.api,
            RunResult(total=cfg.tokens),
            on_chunk=progress.update,
            flush_timeout=cfg.stall + 5.0 if hardened else None,
        )
        if hardened:
            run.stats = stats(handler)
            close(handler, timeout=1.0)
        run.log_lines = logs.lines
    progress.clear()
    return run


def run_scenario(scenario: Scenario, cfg: DemoConfig, out: TextIO | None = None) -> ScenarioResult:
    """Stream once with the handler bare, once hardened; return both observations."""
    from . import harden
    from .testing import options_of

    sink = out if out is not None else sys.stdout
    model = PacedFakeChatModel(tokens=_demo_tokens(cfg.tokens), interval=cfg.interval)
    bare = _observe(model, scenario.make(cfg), "bare", cfg, sink)
    safe = harden(scenario.make(cfg), name=scenario.key)
    hardened = _observe(model, safe, "hardened", cfg, sink)
    title = scenario.title.format(at=cfg.trigger, stall=cfg.stall)
    return ScenarioResult(scenario.key, title, bare, hardened, options_of(safe).breaker)


def run_demo(
    cfg: DemoConfig, out: TextIO | None = None, only: list[str] | None = None
) -> list[ScenarioResult]:
    """Run every scenario (or those named in ``only``), one table per scenario."""
    sink = out if out is not None else sys.stdout
    sink.write(
        f"safecallbacks demo: a fake model streams {cfg.tokens} tokens, one every "
        f"{cfg.interval * 1e3:g} ms, via {API_NAMES[cfg.api]}.\nEach handler is attached "
        "bare, then hardened with safecallbacks.harden(); everything below is measured "
        "in this run.\n"
    )
    results: list[ScenarioResult] = []
    chosen = [s for s in SCENARIOS if not only or s.key in only]
    for number, scenario in enumerate(chosen, 1):
        title = scenario.title.format(at=cfg.trigger, stall=cfg.stall)
        sink.write(f"\n[{number}/{len(chosen)}] handler {title}\n")
        sink.flush()
        result = run_scenario(scenario, cfg, sink)
        results.append(result)
        sink.write(scenario_table(result))
        sink.flush()
    sink.write(
        "\nGrade your own handler the same way: python -m safecallbacks check module:Factory\n"
    )
    return results


def scenario_table(result: ScenarioResult) -> str:
    """Bare and hardened side by side, and why events were skipped if they were."""
    bare, hardened = result.bare, result.hardened
    rows: list[tuple[str, ...]] = [
        ("", "bare", "hardened"),
        (
            "chunks received",
            f"{bare.chunks} of {bare.total}",
            f"{hardened.chunks} of {hardened.total}",
        ),
        ("stream ended", bare.ended, hardened.ended),
        ("longest gap", fmt_s(bare.longest_gap), fmt_s(hardened.longest_gap)),
        ("total time", fmt_s(bare.elapsed), fmt_s(hardened.elapsed)),
        ("log lines", str(bare.log_lines), str(hardened.log_lines)),
    ]
    stats = hardened.stats
    if stats is not None:
        flushed = "" if hardened.flushed else " (flush timed out)"
        rows.append(("handler events", "not counted", outcome_counts(stats) + flushed))
    text = table(rows)
    if stats is not None and stats.skipped and result.breaker is not None:
        text += (
            f"  skipped {stats.skipped}: the circuit breaker opened after "
            f"{result.breaker.failures} consecutive failures and skips the handler for "
            f"{result.breaker.reset:g} s\n"
        )
    return text
