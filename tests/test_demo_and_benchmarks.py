"""Smoke tests: the paced fake model, the demo, and every benchmark script at --quick size.

They check that things run and print what they promise; they never assert speed.
"""

from __future__ import annotations

import importlib.util
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from safecallbacks import _demo
from safecallbacks.testing import PacedFakeChatModel, make_tokens
from tests._child import run_python

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RATIO = re.compile(r"\|\s+\d+\.\d\dx\s+\|")


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_python(args, cwd=ROOT, timeout=timeout)


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self.tokens.append(token)


# --------------------------------------------------------------------------- paced model


def test_paced_model_streams_and_fires_callbacks() -> None:
    model = PacedFakeChatModel(tokens=make_tokens(5), interval=0.001)
    seen = Tokens()
    chunks = [c.content for c in model.stream("hi", config={"callbacks": [seen]})]
    assert chunks == make_tokens(5)
    assert seen.tokens == chunks
    seen = Tokens()
    assert model.invoke("hi", config={"callbacks": [seen]}).content == "".join(chunks)
    assert seen.tokens == chunks


async def test_paced_model_astream_and_ainvoke() -> None:
    model = PacedFakeChatModel(tokens=make_tokens(5), interval=0.001)
    seen = Tokens()
    chunks = [c.content async for c in model.astream("hi", config={"callbacks": [seen]})]
    assert chunks == make_tokens(5)
    assert seen.tokens == chunks
    assert (await model.ainvoke("hi")).content == "".join(chunks)


# --------------------------------------------------------------------------- demo


def test_demo_bare_dies_hardened_survives() -> None:
    out = io.StringIO()
    cfg = _demo.DemoConfig(tokens=8, interval=0.005, stall=1.0)
    results = {r.key: r for r in _demo.run_demo(cfg, out=out)}
    assert set(results) == {"raises", "cancelled", "stalls"}

    for key, error in (("raises", "ConnectionError"), ("cancelled", "CancelledError")):
        r = results[key]
        assert r.bare.died and r.bare.error is not None and error in r.bare.error
        assert r.bare.chunks < r.bare.total
        assert not r.hardened.died
        assert r.hardened.chunks == r.hardened.total == 8
        assert r.hardened.flushed
        assert r.hardened.stats.failed >= 1
        assert r.hardened.stats.pending == 0

    stall = results["stalls"]
    assert stall.bare.chunks == stall.hardened.chunks == 8
    assert stall.bare.longest_gap >= 0.9  # the bare stream waited for the handler
    assert stall.hardened.longest_gap < 0.5  # the hardened one did not
    assert stall.hardened.stats.delivered == stall.hardened.stats.emitted

    text = out.getvalue()
    # One table per scenario: its header row is printed once per scenario, nothing repeats it.
    assert len(re.findall(r"^ +bare +hardened$", text, re.M)) == 3
    for heading in ("chunks received", "stream ended", "longest gap", "total time"):
        assert text.count(heading) == 3
    assert "Summary" not in text
    assert "\r" not in text  # not a terminal: plain lines, no progress redraws
    assert "circuit breaker" not in text  # 7 failures: the breaker (20) never opened
    stats = results["raises"].hardened.stats
    assert (stats.delivered, stats.failed, stats.skipped) == (1, 7, 0)
    assert "8 emitted: 1 delivered, 7 failed, 0 dropped, 0 skipped, 0 pending" in text


def test_demo_explains_the_open_breaker_with_its_real_numbers() -> None:
    out = io.StringIO()
    cfg = _demo.DemoConfig(tokens=30, interval=0.001)  # fails from token 7: 24 failures
    (result,) = _demo.run_demo(cfg, out=out, only=["raises"])
    stats = result.hardened.stats
    # Delivery is in order: tokens 1-6 delivered, 7-26 fail, the breaker opens, 27-30 skipped.
    assert (stats.delivered, stats.failed, stats.skipped, stats.pending) == (6, 20, 4, 0)
    assert stats.breaker == "open"
    text = out.getvalue()
    assert (
        "skipped 4: the circuit breaker opened after 20 consecutive failures and skips "
        "the handler for 30 s" in text
    )
    assert "30 emitted: 6 delivered, 20 failed, 0 dropped, 4 skipped, 0 pending" in text
    assert result.hardened.chunks == 30 and result.hardened.ended == "completed"


def test_demo_cli() -> None:
    proc = run(
        ["-m", "safecallbacks", "demo", "--tokens", "8", "--interval", "0.005", "--stall", "0.3"]
    )
    assert proc.returncode == 0, proc.stderr
    for heading in ("bare", "hardened", "chunks received", "longest gap", "handler events"):
        assert heading in proc.stdout
    assert "died: ConnectionError" in proc.stdout
    assert "died: CancelledError" in proc.stdout
    assert proc.stdout.count("8 of 8") == 4  # hardened thrice, and the bare stalling stream
    assert "python -m safecallbacks check module:Factory" in proc.stdout

    helped = run(["-m", "safecallbacks", "demo", "--help"])
    assert helped.returncode == 0
    assert "--tokens" in helped.stdout and "--interval" in helped.stdout


# --------------------------------------------------------------------------- benchmarks

HEADINGS = {
    "hot_path": ["ns/event (median)", "vs no handler", "vs bare run_inline no-op"],
    "paced_stream": ["total vs none", "p99 vs none", "max gap ms", "CPU-bound stream"],
    "load": ["tokens/s vs none", "p99 vs none"],
    "memory": ["max_queue", "peak RSS growth MB", "dropped"],
    "settle": ["last chunk to return", "first call (hung)"],
    "shared_sink": ["streams' wall s", "lag p99", "backlog gone after", "runs complete & in order"],
}


@pytest.mark.parametrize("name", sorted(HEADINGS))
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    args = [str(BENCH / f"{name}.py"), "--quick"]
    # matplotlib comes with the optional "bench" extra; without it there is no plot to check.
    plotting = name == "paced_stream" and importlib.util.find_spec("matplotlib") is not None
    if plotting:
        args += ["--plot", str(tmp_path / "gaps.png")]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.lstrip().startswith("###")
    assert re.search(r"^\| .+ \|$", out, re.M), "no Markdown table"
    assert re.search(r"^\| -+", out, re.M), "no Markdown table separator"
    for heading in HEADINGS[name]:
        assert heading in out
    if name != "memory":
        assert RATIO.search(out), "no ratio column"
    assert "hardened" in out
    if plotting:
        assert (tmp_path / "gaps.png").stat().st_size > 10_000


def test_run_all_quick(tmp_path: Path) -> None:
    proc = run([str(BENCH / "run_all.py"), "--quick", "--only", "hot_path", "--plot", ""])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("# safecallbacks benchmarks")
    assert "### Hot path" in proc.stdout
    assert RATIO.search(proc.stdout)
