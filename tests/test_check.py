"""``python -m safecallbacks check``, ``--version`` and the bare command.

``check`` grades a handler from real streams, so each test gives it a handler whose
behaviour is known (records, raises, sleeps, blocks the loop, hangs) and asserts the
numbers and the exit code it must come to. Most run in-process through ``main(argv)``;
a few run the real command in a child interpreter.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

import safecallbacks
from safecallbacks._cli import main
from tests._child import output_of, run_python

ROOT = Path(__file__).resolve().parent.parent
REPORT_KEYS = {
    "target",
    "handler",
    "hooks",
    "auto_mode",
    "auto_reason",
    "offload_differs",
    "verdict",
    "exit_code",
    "breaks",
    "stalls",
    "notes",
    "handler_time",
    "raised",
    "event_loop",
    "streams",
    "model",
    "thresholds",
    "rule",
}

HANDLERS = """
import time
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler


class SlowSink(BaseCallbackHandler):
    def on_llm_new_token(self, token, **kwargs):
        time.sleep(0.02)  # a synchronous write to a slow log sink


def make_slow():
    return SlowSink()


class LoopBlocker(AsyncCallbackHandler):
    async def on_llm_new_token(self, token, **kwargs):
        time.sleep(0.1)  # blocking I/O inside an async hook


MADE = []


class CountsStarts(BaseCallbackHandler):
    def __init__(self):
        self.starts = 0
        self.tokens = 0

    def on_chat_model_start(self, serialized, messages, **kwargs):
        self.starts += 1

    def on_llm_new_token(self, token, **kwargs):
        self.tokens += 1


def make_counting():
    made = CountsStarts()
    MADE.append(made)
    return made


class ThreadNames(BaseCallbackHandler):
    # Keeps the name of the thread each token reached it on (as a UI session would).

    def __init__(self):
        self.threads = set()

    def on_llm_new_token(self, token, **kwargs):
        import threading

        self.threads.add(threading.current_thread().name)
"""


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh module of test handlers, importable by a unique name; returns the module."""
    import importlib

    name = f"check_handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HANDLERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def check(*args: str) -> tuple[int, dict[str, Any]]:
    """Run ``check --json`` in-process; returns the exit code and the parsed report."""
    out = io.StringIO()
    code = main(["check", *args, "--json"], out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, out.getvalue()  # one JSON object, nothing else on stdout
    report = json.loads(lines[0])
    assert report["exit_code"] == code
    return code, report


def streams(report: dict[str, Any], handler: str) -> list[dict[str, Any]]:
    return [s for s in report["streams"] if s["handler"] == handler]


# --------------------------------------------------------------------------- verdicts


def test_a_quick_recording_handler_passes() -> None:
    code, report = check("safecallbacks.testing:RecordingHandler")
    if code == 1 and not report["breaks"] and report["stalls"]:
        # Every stall verdict is a timing threshold (a 50 ms gap on a bare stream, 5 ms at
        # p99, a 50 ms loop lag). A loaded 2-core CI machine tripped one once for this quick
        # handler (3.13); a handler that is slow trips it again, a hiccup does not.
        first = report["stalls"]
        code, report = check("safecallbacks.testing:RecordingHandler")
        assert code == 0, f"stalls twice: {first} then {report['stalls']}"
    assert code == 0, report["breaks"]
    assert set(report) == REPORT_KEYS
    assert report["verdict"] == "ok"
    assert report["breaks"] == [] and report["stalls"] == [] and report["raised"] == []
    assert report["handler"] == "safecallbacks.testing.RecordingHandler"
    assert report["auto_mode"] == "offload"
    assert report["hooks"]["on_llm_new_token"] == "sync"
    # 60 tokens + on_chat_model_start + on_llm_end on the paced stream, 59 + 2 on the other.
    for api in ("sync", "async"):
        timing = report["handler_time"][api]
        assert timing["events"] == 62 + 61
        assert 0 < timing["p50_ms"] <= timing["p99_ms"] <= timing["max_ms"]
        assert timing["p99_ms"] < report["thresholds"]["p99_ms"]
    assert len(report["streams"]) == 12  # 2 models x 2 apis x (none, bare, hardened)
    for run in report["streams"]:
        assert run["ended"] == "completed"
        assert run["chunks"] == run["expected"] > 0
    for run in streams(report, "hardened"):
        assert run["stats"]["delivered"] == run["stats"]["emitted"] == run["chunks"] + 2
        assert run["stats"]["flushed"] is True
    assert report["event_loop"]["blocked"] is False


def test_a_raising_handler_is_reported_as_breaking_streams() -> None:
    code, report = check("safecallbacks.testing:FaultyHandler")
    assert code == 1
    assert report["verdict"] == "would break a stream bare"
    assert report["stalls"] == []
    assert len(report["breaks"]) == 4  # every bare stream, both models, both apis
    assert all("ValueError('handler failure')" in line for line in report["breaks"])
    # FaultyHandler raises from every hook with raise_error=True: the first hook kills it.
    assert report["raised"] == [
        {
            "hook": "on_chat_model_start",
            "error": "ValueError",
            "count": 2,
            "example": "ValueError('handler failure')",
            "api": api,
        }
        for api in ("sync", "async")
    ]
    for run in streams(report, "bare"):
        assert (run["chunks"], run["ended"]) == (0, "died: ValueError('handler failure')")
    for run in streams(report, "hardened"):
        assert run["ended"] == "completed" and run["chunks"] == run["expected"]
        assert run["stats"]["failed"] == 20  # the breaker's default threshold
        assert run["stats"]["skipped"] == run["stats"]["emitted"] - 20


def test_the_text_report_names_the_error_and_the_verdict() -> None:
    out = io.StringIO()
    assert main(["check", "safecallbacks.testing:FaultyHandler", "--tokens", "8"], out=out) == 1
    text = out.getvalue()
    assert "Verdict: WOULD BREAK A STREAM BARE (exit 1)" in text
    assert "on_chat_model_start raised ValueError('handler failure')" in text
    assert "died: ValueError('handler failure')" in text
    assert "auto mode  offload" in text


def test_a_slow_handler_is_reported_as_stalling_streams(handlers: Any) -> None:
    code, report = check(f"{handlers.__name__}:make_slow", "--tokens", "12")
    assert code == 1
    assert report["verdict"] == "would stall a stream bare"
    assert report["breaks"] == [] and report["raised"] == []
    for api in ("sync", "async"):
        timing = report["handler_time"][api]
        assert timing["events"] == 12 + 11  # on_llm_new_token only: the one hook it has
        assert 19 <= timing["p50_ms"] <= timing["p99_ms"]
    assert any("p99" in line and ".stream()" in line for line in report["stalls"])
    assert any("p99" in line and ".astream()" in line for line in report["stalls"])
    paced = {(s["api"], s["handler"]): s for s in report["streams"] if s["model"] == "paced"}
    # Bare, each of the 12 tokens waits 20 ms more; hardened, the stream keeps its pace.
    assert paced["sync", "bare"]["total_ms"] >= paced["sync", "none"]["total_ms"] + 200
    # (The last chunk: the call's end may then wait, bounded by settle, for the backlog.)
    assert paced["sync", "hardened"]["last_chunk_ms"] < paced["sync", "bare"]["total_ms"] - 150


def test_an_async_hook_that_blocks_the_loop_is_caught(handlers: Any) -> None:
    code, report = check(f"{handlers.__name__}:LoopBlocker", "--tokens", "4")
    assert code == 1
    assert report["hooks"] == {"on_llm_new_token": "async"}
    loop = report["event_loop"]
    assert loop["blocked"] is True
    assert loop["max_lag_ms"] >= 90  # each token's hook held the loop for 100 ms
    assert any("blocked the event loop" in line for line in report["stalls"])


def test_every_stream_gets_a_fresh_handler(handlers: Any) -> None:
    code, _ = check(f"{handlers.__name__}:make_counting", "--tokens", "6")
    assert code == 0
    made = handlers.MADE
    # 4 bare streams, 4 hardened ones, and one inline and one offloaded for the comparison
    assert len(made) == 10
    assert [h.starts for h in made] == [1] * 10  # each instance saw exactly one stream
    assert [h.tokens for h in made[:2]] == [6, 6]  # the paced streams, sync then async


@pytest.mark.parametrize(
    "target",
    [
        "langchain_core.callbacks:UsageMetadataCallbackHandler",
        "langchain_core.callbacks:StdOutCallbackHandler",
    ],
)
def test_langchain_core_handlers_pass_and_run_inline(target: str) -> None:
    module, _, name = target.partition(":")
    if not hasattr(importlib.import_module(module), name):
        pytest.skip(f"{name} is not in this langchain-core")
    code, report = check(target)
    assert code == 0
    assert report["auto_mode"] == "inline"
    assert report["verdict"] == "ok"
    assert any("inline" in note for note in report["notes"])
    if "UsageMetadata" in target:  # on_llm_end fires once per stream
        assert report["handler_time"]["sync"]["events"] == 2
    else:  # chain hooks only: a chat model stream fires none of them, and check says so
        assert report["handler_time"]["sync"]["events"] == 0
        assert any("none of its hooks fired" in note for note in report["notes"])


def test_check_says_why_auto_chose_and_when_offloaded_data_would_differ(handlers: Any) -> None:
    _, report = check(f"{handlers.__name__}:ThreadNames", "--tokens", "6")
    assert report["auto_mode"] == "offload"
    assert "application's own code" in report["auto_reason"]
    assert report["offload_differs"] == ["threads"]
    assert any("differs from inline (threads)" in note for note in report["notes"])
    _, quiet = check(f"{handlers.__name__}:make_counting", "--tokens", "6")
    assert quiet["offload_differs"] == []  # a collector that keeps up is complete at return


# --------------------------------------------------------------------------- bad targets


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:X", "cannot import module 'nosuchmodule': ModuleNotFoundError"),
        ("json:dumps", "json:dumps is not a handler factory: calling it with no arguments"),
        ("json:JSONDecoder", "not a LangChain callback handler"),
        ("json:nothing_here", "module 'json' has no attribute 'nothing_here'"),
        ("json", "expected module:Factory"),
        ("safecallbacks:__version__", "is a str, not callable"),
    ],
)
def test_a_bad_target_exits_2_saying_what_is_wrong(
    target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("safecallbacks check: ")
    assert message in captured.err


def test_a_factory_returning_something_else_is_named() -> None:
    out = io.StringIO()
    assert main(["check", "os:getcwd", "--json"], out=out) == 2
    report = json.loads(out.getvalue())
    assert report == {"target": "os:getcwd", "error": report["error"], "exit_code": 2}
    assert report["error"].startswith(f"os:getcwd() returned str ({os.getcwd()!r:.60}), not a")


# --------------------------------------------------------------------------- the real command


def test_check_as_a_command_grades_a_module_in_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "my_handlers.py").write_text(textwrap.dedent(HANDLERS))
    done = run_python(
        ["-m", "safecallbacks", "check", "my_handlers:make_slow", "--tokens", "8"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1, output_of(done)
    assert "safecallbacks check my_handlers:make_slow" in done.stdout
    assert "Verdict: WOULD STALL A STREAM BARE (exit 1)" in done.stdout
    assert "handler time per event p99" in done.stdout


def test_a_hung_handler_cannot_hang_check(tmp_path: Path) -> None:
    done = run_python(
        [
            "-m",
            "safecallbacks",
            "check",
            "safecallbacks.testing:BlockingHandler",
            "--json",
            "--timeout",
            "0.5",
        ],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        timeout=60,  # a check that hangs on the handler fails here
    )
    assert done.returncode == 1, output_of(done)
    report = json.loads(done.stdout)
    bare = {(s["model"], s["api"]): s for s in streams(report, "bare")}
    for api in ("sync", "async"):
        assert bare["paced", api]["ended"] == "stalled: did not finish within 0.5 s"
        assert bare["paced", api]["chunks"] == 0
        assert bare["cpu", api]["ended"] == "not run: an earlier bare stream stalled"
    for run in streams(report, "hardened"):  # hardened, the hung handler costs nothing
        assert run["ended"] == "completed" and run["chunks"] == run["expected"]


def test_version_and_bare_command() -> None:
    version = run_python(["-m", "safecallbacks", "--version"], cwd=ROOT)
    assert version.returncode == 0, output_of(version)
    assert version.stdout.strip() == f"safecallbacks {safecallbacks.__version__}"

    bare = run_python(["-m", "safecallbacks"], cwd=ROOT)
    assert bare.returncode == 0, output_of(bare)
    assert bare.stdout.startswith("usage: python -m safecallbacks")
    for command in ("demo", "check", "--version"):
        assert command in bare.stdout


def test_bare_main_prints_usage_and_returns_0() -> None:
    out = io.StringIO()
    assert main([], out=out) == 0
    assert "check" in out.getvalue() and "demo" in out.getvalue()
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
