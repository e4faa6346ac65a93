"""The one way tests run code in a child interpreter.

Exit drains, ``os.fork()``, per-process worker pools and exceptions that wreck an event
loop are only observable in a process of their own, never in pytest's. Each script is
written to a directory the test owns and run with this interpreter; every run is bounded
by ``timeout``. A script reports by printing JSON lines (``json_lines``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHILD_TIMEOUT = 60.0  # a script that needs longer than this has hung


def run_child(
    directory: Path,
    source: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = CHILD_TIMEOUT,
    name: str = "child.py",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Write ``source`` (dedented) to ``directory/name`` and run it with ``args``.

    ``env`` is added to this process's environment. With ``check`` the child must exit 0;
    the assertion message carries its output.
    """
    script = directory / name
    script.write_text(textwrap.dedent(source))
    done = run_python([str(script), *args], env=env, timeout=timeout)
    if check:
        assert done.returncode == 0, output_of(done)
    return done


def run_python(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = CHILD_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ``args`` (a script, or ``-m module ...``), output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )


def output_of(done: subprocess.CompletedProcess[str], tail: int = 3000) -> str:
    """The child's stdout and the end of its stderr, for assertion messages."""
    return done.stdout + done.stderr[-tail:]


def json_lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every line of the child's stdout that is a JSON object, in order."""
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


# Head of a reporting script: a report registered *before* safecallbacks is imported, so
# (atexit being last-in, first-out) it runs after the package's own exit drain. The body
# fills RESULT, puts hardened handlers to watch in WATCHED and functions to run after the
# drain in LATE; the report is printed as one JSON line.
REPORTING_PRELUDE = """
import atexit, json, os, sys, threading, time, asyncio
RESULT = {}
WATCHED = {}
LATE = []  # functions run by report(), after the package's exit drain

def summary(stats):
    return {name: getattr(stats, name) for name in
            ("emitted", "delivered", "failed", "dropped", "skipped", "pending", "closed")}

def report():
    for late in LATE:
        late()
    RESULT["drain_seconds"] = time.monotonic() - RESULT.get("main_done", time.monotonic())
    RESULT["after_exit"] = {name: summary(safe.stats()) for name, safe in WATCHED.items()}
    print(json.dumps(RESULT), flush=True)

atexit.register(report)

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from safecallbacks import harden
from safecallbacks.testing import fake_chat_model
"""


def run_reporting(
    directory: Path, body: str, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``body`` after ``REPORTING_PRELUDE``; returns its report plus ``wall_seconds``."""
    started = time.monotonic()
    done = run_child(directory, textwrap.dedent(REPORTING_PRELUDE) + textwrap.dedent(body), env=env)
    took = time.monotonic() - started
    lines = json_lines(done)
    assert lines, output_of(done)
    result = lines[-1]
    result["wall_seconds"] = took
    return result
