"""One hardened handler per request: a thousand of them must not mean a thousand threads.

Runs in a child interpreter with ``SAFECALLBACKS_WORKER_IDLE=0.2`` (read when the worker
pool is created), so idle workers leave quickly and "back to baseline" is observable in a
bounded wait. The script counts every ``Thread.start()`` in the process and samples
``threading.active_count()`` while the requests run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)

REQUESTS = 1_000

SCRIPT = """
import asyncio, json, sys, threading, time

STARTED = []
_start = threading.Thread.start

def counting_start(self):
    STARTED.append(self.name)
    _start(self)

threading.Thread.start = counting_start

from safecallbacks import harden
from safecallbacks._dispatch import worker_threads
from safecallbacks.testing import (
    AsyncRecordingHandler, RecordingHandler, fake_chat_model, wait_until)

MODE, REQUESTS = sys.argv[1], int(sys.argv[2])
WORDS = 3  # five chunks, seven events per request
baseline = threading.active_count()
peak = [baseline]
lib_peak = [0]
done = threading.Event()

def note():
    peak[0] = max(peak[0], threading.active_count())
    ours = sum(t.name.startswith("safecallbacks") for t in threading.enumerate())
    lib_peak[0] = max(lib_peak[0], ours)

def sample():
    while not done.is_set():
        note()
        done.wait(0.002)

sampler = threading.Thread(target=sample, name="sampler")
sampler.start()
baseline_with_sampler = baseline + 1
bad = []

def request(model):
    handler = RecordingHandler()
    with harden(handler) as safe:
        for _ in model.stream("hi", config={"callbacks": [safe]}):
            pass
        note()
    if len(handler.calls) != 7 or safe.stats().pending:
        bad.append(safe.stats().pending)

async def arequest(model):
    handler, ahandler = RecordingHandler(), AsyncRecordingHandler()
    async with harden(handler) as safe, harden(ahandler) as asafe:
        async for _ in model.astream("hi", config={"callbacks": [safe, asafe]}):
            pass
    if len(handler.calls) != 7 or len(ahandler.calls) != 7:
        bad.append((len(handler.calls), len(ahandler.calls)))

if MODE == "sequential":
    model = fake_chat_model(WORDS, replies=REQUESTS)
    for _ in range(REQUESTS):
        request(model)
elif MODE == "threads":
    model = fake_chat_model(WORDS, replies=REQUESTS)
    def serve(count):
        for _ in range(count):
            request(model)
    servers = [threading.Thread(target=serve, args=(REQUESTS // 8,), name=f"server-{i}")
               for i in range(8)]
    for server in servers:
        server.start()
    for server in servers:
        server.join(120)
elif MODE == "asyncio":
    model = fake_chat_model(WORDS, replies=REQUESTS)
    async def main():
        for first in range(0, REQUESTS, 50):
            await asyncio.gather(*(arequest(model) for _ in range(50)))
    asyncio.run(main())

note()
workers_at_end = worker_threads()
ended = wait_until(
    lambda: worker_threads() == 0 and threading.active_count() == baseline_with_sampler,
    timeout=15.0,
)
done.set()
sampler.join(5)
print(json.dumps({
    "bad": bad[:5],
    "bad_count": len(bad),
    "baseline": baseline,
    "peak_extra": peak[0] - baseline_with_sampler,
    "lib_peak": lib_peak[0],
    "started": [name for name in STARTED if name.startswith("safecallbacks")],
    "others_started": sorted({name for name in STARTED if not name.startswith("safecallbacks")}),
    "workers_at_end": workers_at_end,
    "back_to_baseline": ended,
    "left": [t.name for t in threading.enumerate()],
}))
"""


def run(directory: Path, mode: str) -> dict[str, Any]:
    script = directory / f"per_request_handlers_{mode}.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "SAFECALLBACKS_WORKER_IDLE": "0.2"}
    done = subprocess.run(
        [sys.executable, str(script), mode, str(REQUESTS)],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """One child run per mode, shared by the tests that look at it."""
    directory = tmp_path_factory.mktemp("threads")
    cache: dict[str, dict[str, Any]] = {}

    def get(mode: str) -> dict[str, Any]:
        if mode not in cache:
            cache[mode] = run(directory, mode)
        return cache[mode]

    return get


# Extra threads the script's own machinery runs at the same time: 8 request-serving threads
# in "threads" mode; asyncio's default executor (at most min(32, cpus + 4)) in "asyncio" mode,
# which LangChain uses to iterate GenericFakeChatModel's sync stream, plus the thread
# asyncio.run starts to shut that executor down.
OTHERS = {"sequential": 0, "threads": 8, "asyncio": min(32, (os.cpu_count() or 1) + 4) + 1}


FEW = 32  # "far fewer than one per request": a few dozen at the very most
# Over the whole run: the child lets idle workers go after 0.2 s, so bursts separated by a
# quiet moment may start new ones; still at most a few percent of the 1,000 requests.
STARTED_AT_MOST = 64


@pytest.mark.parametrize("mode", ["sequential", "threads", "asyncio"])
def test_a_thousand_short_lived_handlers_share_a_few_threads(
    results: Callable[[str], dict[str, Any]], mode: str
) -> None:
    """1,000 requests, each with its own hardened handler, one at a time ("sequential"),
    from 8 server threads ("threads") or 50 at a time on one event loop ("asyncio").

    Every delivery takes microseconds and nothing is blocked, so a few workers keep up;
    the pool must neither start a worker per request nor one per concurrent request.
    """
    result = results(mode)
    assert result["bad_count"] == 0, result["bad"]
    started = result["started"]
    assert len(started) <= STARTED_AT_MOST, f"{len(started)} workers started: {started[-5:]}"
    assert result["lib_peak"] <= FEW, result  # threads alive at the same time
    assert result["peak_extra"] <= result["lib_peak"] + OTHERS[mode], result
    if mode == "sequential":
        # One request at a time: a couple of workers do all the work.
        assert len(started) <= 4, started
    # And once the requests are over, the idle workers leave: nothing is left behind.
    assert result["back_to_baseline"], result["left"]
