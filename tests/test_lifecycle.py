"""Process and loop lifecycle: interpreter exit, ``os.fork()``, and event loops that close.

Exit and fork are tested in child interpreters (small scripts written to ``tmp_path``), so
the atexit drain really runs and a fork never copies pytest's own threads. Each script
prints one JSON line; every ``subprocess.run`` is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler

from safecallbacks import harden
from safecallbacks.testing import (
    AsyncRecordingHandler,
    assert_accounted,
    fake_chat_model,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

SCRIPT_TIMEOUT = 60.0  # a script that needs longer than this has hung
EXIT_MARGIN = 1.5  # slack on top of exit_timeout for a loaded 2-core machine

# Shared head of every script: a report registered *before* safecallbacks is imported, so
# (atexit being last-in, first-out) it runs after the package's own exit drain.
PRELUDE = """
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


def run_script(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        env=full_env,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout + done.stderr[-3000:]
    result: dict[str, Any] = json.loads(lines[-1])
    result["wall_seconds"] = took
    return result


# --------------------------------------------------------------------------------------------
# Interpreter exit
# --------------------------------------------------------------------------------------------

HUNG_AT_EXIT = """
class Hung(BaseCallbackHandler):
    # Sync or async, it takes three tokens and then never returns from the fourth.
    def __init__(self):
        self.tokens = 0
        self.entered = threading.Event()

    def on_chat_model_start(self, serialized, messages, **kwargs):
        pass

    def on_llm_end(self, response, **kwargs):
        pass

class SyncHung(Hung):
    def on_llm_new_token(self, token, **kwargs):
        self.tokens += 1
        if self.tokens > 3:
            self.entered.set()
            threading.Event().wait()

class AsyncHung(AsyncCallbackHandler):
    def __init__(self):
        self.tokens = 0
        self.entered = threading.Event()

    async def on_chat_model_start(self, serialized, messages, **kwargs):
        pass

    async def on_llm_new_token(self, token, **kwargs):
        self.tokens += 1
        if self.tokens > 3:
            self.entered.set()
            await asyncio.Event().wait()

    async def on_llm_end(self, response, **kwargs):
        pass

handler = SyncHung() if KIND == "sync" else AsyncHung()
options = {} if EXIT_TIMEOUT is None else {"exit_timeout": EXIT_TIMEOUT}
safe = WATCHED["hung"] = harden(handler, **options)
for _ in fake_chat_model(20).stream("hi", config={"callbacks": [safe]}):
    pass
assert handler.entered.wait(10)
RESULT["at_main_end"] = summary(safe.stats())
RESULT["main_done"] = time.monotonic()
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("how", ["option", "env"])
def test_exit_is_bounded_with_a_hung_handler(tmp_path: Path, kind: str, how: str) -> None:
    exit_timeout = 0.5
    preamble = f"KIND = {kind!r}\nEXIT_TIMEOUT = {exit_timeout if how == 'option' else None!r}\n"
    env = {"SAFECALLBACKS_EXIT_TIMEOUT": str(exit_timeout)} if how == "env" else {}
    result = run_script(tmp_path, preamble + textwrap.dedent(HUNG_AT_EXIT), env=env)
    assert result["drain_seconds"] <= exit_timeout + EXIT_MARGIN, result
    assert result["drain_seconds"] >= exit_timeout * 0.9, "the drain gave up before its deadline"
    stats = result["after_exit"]["hung"]
    events = 39 + 2
    assert stats["emitted"] == events
    assert stats["closed"] is True
    # Start and three tokens delivered, the fourth token stuck in the handler for good; the
    # 36 events queued behind it can never be delivered and must be counted as dropped.
    assert stats["delivered"] == 4, result
    assert stats["dropped"] == events - 5, result
    assert stats["pending"] == 1, result


SLOW_AT_EXIT = """
class SyncSlow(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        time.sleep(0.01)
        self.tokens.append(token)

class AsyncSlow(AsyncCallbackHandler):
    def __init__(self):
        self.tokens = []

    async def on_llm_new_token(self, token, **kwargs):
        await asyncio.sleep(0.01)
        self.tokens.append(token)

handlers = {"sync": SyncSlow(), "async": AsyncSlow()}
for name, handler in handlers.items():
    WATCHED[name] = harden(handler, exit_timeout=20.0)
config = {"callbacks": list(WATCHED.values())}
chunks = [c.content for c in fake_chat_model(20).stream("hi", config=config)]

def final_tokens():
    RESULT["tokens_ok"] = {name: h.tokens == chunks for name, h in handlers.items()}
    RESULT["token_counts"] = {name: len(h.tokens) for name, h in handlers.items()}

LATE.append(final_tokens)
RESULT["at_main_end"] = {name: summary(safe.stats()) for name, safe in WATCHED.items()}
RESULT["main_done"] = time.monotonic()
"""


def test_exit_delivers_pending_events_of_a_slow_handler(tmp_path: Path) -> None:
    result = run_script(tmp_path, SLOW_AT_EXIT)
    for name in ("sync", "async"):
        at_end, after = result["at_main_end"][name], result["after_exit"][name]
        assert at_end["pending"] > 0, "nothing was left for the exit drain to do"
        assert after["pending"] == 0, result
        assert after["delivered"] == after["emitted"] == 39, result
        assert after["dropped"] == 0
    assert result["token_counts"] == {"sync": 39, "async": 39}
    assert result["tokens_ok"] == {"sync": True, "async": True}, "in order, each once"
    assert result["drain_seconds"] < 20.0


def test_exit_without_hardened_handlers_pending_is_immediate(tmp_path: Path) -> None:
    body = """
    from safecallbacks.testing import RecordingHandler
    safe = WATCHED["idle"] = harden(RecordingHandler(), exit_timeout=10.0)
    for _ in fake_chat_model(5).stream("hi", config={"callbacks": [safe]}):
        pass
    assert safe.flush(10)
    RESULT["main_done"] = time.monotonic()
    """
    result = run_script(tmp_path, body)
    assert result["drain_seconds"] < EXIT_MARGIN  # nothing pending: no wait for exit_timeout
    assert result["after_exit"]["idle"]["pending"] == 0


# --------------------------------------------------------------------------------------------
# os.fork()
# --------------------------------------------------------------------------------------------

FORK = """
from safecallbacks._dispatch import worker_threads
from safecallbacks.testing import AsyncRecordingHandler, RecordingHandler

PARENT = os.getpid()

class ParentOnlyHang(RecordingHandler):
    # Hangs on every token, but only in the parent process.
    def __init__(self):
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()

    def on_llm_new_token(self, *args, **kwargs):
        if os.getpid() == PARENT:
            self.entered.set()
            self.gate.wait()
        self.record("on_llm_new_token", args, kwargs)

handlers = {"sync": RecordingHandler(), "async": AsyncRecordingHandler(), "hang": ParentOnlyHang()}
safes = {name: harden(h, breaker=None) for name, h in handlers.items()}
config = {"callbacks": list(safes.values())}
calm = {"callbacks": [safes["sync"], safes["async"]]}
model = fake_chat_model(5, replies=5)  # 9 chunks, 11 events per stream
# The hung handler first, so that it has a worker of its own before the others start.
for _ in model.stream("hi", config={"callbacks": [safes["hang"]]}):
    pass
assert handlers["hang"].entered.wait(10)
for _ in model.stream("hi", config=calm):
    pass
assert safes["sync"].flush(10) and safes["async"].flush(10)

read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    out = {"fresh": {n: summary(s.stats()) for n, s in safes.items()},
           "workers_at_start": worker_threads(),
           "calls_at_start": {n: len(h.calls) for n, h in handlers.items()}}
    for _ in model.stream("hi", config=config):
        pass
    out["flushed"] = {n: s.flush(10) for n, s in safes.items()}
    out["after"] = {n: summary(s.stats()) for n, s in safes.items()}
    out["calls_after"] = {n: len(h.calls) for n, h in handlers.items()}
    os.write(write_end, json.dumps(out).encode())
    os.close(write_end)
    os._exit(0)

os.close(write_end)
data = b""
while True:
    chunk = os.read(read_end, 65536)
    if not chunk:
        break
    data += chunk
_, status = os.waitpid(pid, 0)
RESULT["child_exit"] = os.waitstatus_to_exitcode(status)
RESULT["child"] = json.loads(data or b"{}")
for _ in model.stream("hi", config=calm):
    pass
for _ in model.stream("hi", config={"callbacks": [safes["hang"]]}):
    pass
RESULT["parent_flushed"] = {n: safes[n].flush(10) for n in ("sync", "async")}
RESULT["parent"] = {n: summary(s.stats()) for n, s in safes.items()}
handlers["hang"].gate.set()
RESULT["parent_hang_flushed"] = safes["hang"].flush(10)
RESULT["parent_after_release"] = summary(safes["hang"].stats())
RESULT["main_done"] = time.monotonic()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_fresh_and_parent_carries_on(tmp_path: Path) -> None:
    result = run_script(tmp_path, FORK)
    per_stream = 11
    assert result["child_exit"] == 0, result
    child = result["child"]
    for name in ("sync", "async", "hang"):
        fresh = child["fresh"][name]
        assert fresh["emitted"] == fresh["delivered"] == fresh["pending"] == 0, child
        assert fresh["dropped"] == 0
        assert child["flushed"][name] is True, child
        after = child["after"][name]
        assert after["emitted"] == after["delivered"] == per_stream, child
        assert after["pending"] == 0
    assert child["workers_at_start"] == 0
    # The handlers' own memory was copied by fork; the child added exactly its own events.
    for name in ("sync", "async"):
        assert child["calls_after"][name] - child["calls_at_start"][name] == per_stream
    # The hung handler's queue in the parent was not replayed in the child.
    assert child["calls_after"]["hang"] - child["calls_at_start"]["hang"] == per_stream

    parent = result["parent"]
    for name in ("sync", "async"):
        assert result["parent_flushed"][name] is True
        assert parent[name]["emitted"] == parent[name]["delivered"] == 2 * per_stream
    assert result["parent_hang_flushed"] is True
    released = result["parent_after_release"]
    assert released["emitted"] == released["delivered"] == 2 * per_stream


FORK_WHILE_LOCKED = """
import safecallbacks
from safecallbacks import _hardened, _install, _observe, _policy
from safecallbacks.testing import RecordingHandler

held, release = threading.Event(), threading.Event()
LOCKS = {
    "core": lambda: _hardened._CORE_LOCK,
    "classes": lambda: _hardened._classes_lock,
    "install": lambda: _install._lock,
    "policy": lambda: _policy._lock,
    "instruments": lambda: _observe._instruments_lock,
}

def hold_every_lock():
    for get in LOCKS.values():
        get().acquire()
    held.set()
    release.wait()
    for get in LOCKS.values():
        get().release()

threading.Thread(target=hold_every_lock, daemon=True).start()
assert held.wait(10)
pid = os.fork()
if pid == 0:
    # The child must be able to do everything that takes those locks.
    class Fresh(RecordingHandler):
        pass
    handler = harden(Fresh(), mode="offload")
    safecallbacks.register_inline("some.module.Tracer")
    safecallbacks.install()
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    ok = handler.flush(10)
    safecallbacks.uninstall()
    os._exit(0 if ok and len(handler.calls) == 7 else 3)
release.set()
deadline = time.monotonic() + 20
status = None
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
RESULT["child_exit"] = os.waitstatus_to_exitcode(status) if done else "hung"
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_holds_a_package_lock_leaves_the_child_working(
    tmp_path: Path,
) -> None:
    result = run_script(tmp_path, FORK_WHILE_LOCKED)
    assert result["child_exit"] == 0, result


# --------------------------------------------------------------------------------------------
# Event loops that close with events still queued
# --------------------------------------------------------------------------------------------


class SlowAsync(AsyncCallbackHandler):
    def __init__(self, delay: float | None) -> None:
        self.delay = delay  # None: never returns
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        self.tokens.append(token)


@pytest.mark.parametrize("delay", [0.01, None], ids=["slow", "hung"])
def test_asyncio_run_ending_with_events_pending_accounts_for_them(delay: float | None) -> None:
    handler = SlowAsync(delay)
    exit_timeout = 0.3
    safe = harden(handler, exit_timeout=exit_timeout, breaker=None)
    seen: dict[str, Any] = {}

    async def main() -> None:
        async for _ in fake_chat_model(20).astream("hi", config={"callbacks": [safe]}):
            pass
        seen["pending_in_loop"] = safe.stats().pending
        # Returning without aflush(): asyncio.run now cancels the delivery task and closes.

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 30 * 0.01 + exit_timeout + EXIT_MARGIN
    assert seen["pending_in_loop"] > 0
    stats = safe.stats()
    assert stats.emitted == 39
    assert stats.pending == 0, stats
    # A delivery cut off by the shutdown may have finished in the handler a moment before
    # its consumer was cancelled: then it is counted failed, never lost and never twice.
    assert stats.delivered <= len(handler.tokens) <= stats.delivered + stats.failed, stats
    assert stats.delivered + stats.failed + stats.dropped == stats.emitted, stats
    assert_accounted(stats)
    assert safe.flush(1)


def test_loop_closed_without_cancelling_its_tasks_accounts_for_the_events() -> None:
    handler = SlowAsync(0.01)
    safe = harden(handler, breaker=None)

    async def main() -> None:
        async for _ in fake_chat_model(20).astream("hi", config={"callbacks": [safe]}):
            pass

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()  # the delivery task is still pending: it will never run again
    del loop
    first = safe.stats()
    unraisable: list[Any] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        gc.collect()  # the abandoned delivery coroutines are closed now, not at some later time
    finally:
        sys.unraisablehook = previous_hook
    stats = safe.stats()
    for seen in (first, stats):  # before and after the garbage is gone: the same account
        assert seen.emitted == 39
        assert seen.pending == 0, seen
        assert seen.delivered == len(handler.tokens)
        assert_accounted(seen)  # each event counted once, however the loop went away
    assert stats.dropped == first.dropped and stats.failed == first.failed
    # The handler did nothing wrong: closing the loop must not be reported as its failure,
    # nor print "Exception ignored in: <coroutine ...>" when the leftovers are collected.
    assert "GeneratorExit" not in stats.errors, stats
    assert not unraisable, [f"{u.exc_value!r} in {u.object!r}" for u in unraisable]


def test_flush_is_not_held_up_by_an_emitting_loop_that_closes_meanwhile() -> None:
    """Everything was delivered; a loop that stops and closes during the flush owes nothing."""
    handler = AsyncRecordingHandler()
    safe = harden(handler)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()

    async def stream() -> bool:
        async for _ in fake_chat_model(5).astream("hi", config={"callbacks": [safe]}):
            pass
        return await safe.aflush(10)

    assert asyncio.run_coroutine_threadsafe(stream(), loop).result(30)
    assert safe.stats().pending == 0
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)  # stopped, not closed yet
    outcome: dict[str, Any] = {}

    def flush() -> None:
        started = time.monotonic()
        outcome["ok"] = safe.flush(5.0)
        outcome["took"] = time.monotonic() - started

    flusher = threading.Thread(target=flush)
    flusher.start()
    # Wait until the flush has queued its marker on the stopped loop's lane (internal peek).
    (lane,) = [lane for lane in safe._sc_core.lanes() if getattr(lane, "loop", None) is loop]
    assert wait_until(lambda: len(lane.queue) >= 1 or not flusher.is_alive(), 5)
    loop.close()
    flusher.join(10)
    assert outcome.get("ok") is True, outcome
    assert outcome["took"] < 5.0 - 1.0, outcome


def test_closed_loops_are_not_kept_alive_by_a_shared_handler() -> None:
    """One asyncio.run per request with a module-level handler must not accumulate loops."""
    safe = harden(AsyncRecordingHandler())
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def request() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async for _ in fake_chat_model(2).astream("hi", config={"callbacks": [safe]}):
            pass
        assert await safe.aflush(10)

    for _ in range(50):
        asyncio.run(request())
    gc.collect()
    alive = sum(ref() is not None for ref in loops)
    assert alive <= 1, f"{alive} closed event loops are still referenced"
    assert_accounted(safe.stats())
