"""Helpers for testing code that uses safecallbacks, in your suite or ours.

Everything here is real LangChain: handlers are ``BaseCallbackHandler``
subclasses and the model is langchain-core's ``GenericFakeChatModel``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from ._hooks import HOOKS
from ._options import Options
from ._paced import PacedFakeChatModel, make_tokens
from ._stats import Stats

__all__ = [
    "HOOKS",
    "AsyncRecordingHandler",
    "BlockingHandler",
    "FakeClock",
    "FaultyHandler",
    "PacedFakeChatModel",
    "RecordingHandler",
    "assert_accounted",
    "async_wait_until",
    "fake_chat_model",
    "make_tokens",
    "options_of",
    "retire_idle_workers",
    "use_clock",
    "wait_until",
    "worker_threads",
]


@dataclass
class Call:
    """One hook invocation as a handler saw it."""

    hook: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    thread: str = field(default_factory=lambda: threading.current_thread().name)

    @property
    def run_id(self) -> Any:
        return self.kwargs.get("run_id")

    @property
    def token(self) -> Any:
        """The token of an ``on_llm_new_token`` call (LangChain passes it by keyword)."""
        return self.kwargs["token"] if "token" in self.kwargs else self.args[0]


def _recording_hook(hook: str) -> Callable[..., None]:
    def record(self: RecordingHandler, *args: Any, **kwargs: Any) -> None:
        self.record(hook, args, kwargs)

    record.__name__ = hook
    return record


def _async_recording_hook(hook: str) -> Callable[..., Any]:
    async def record(self: AsyncRecordingHandler, *args: Any, **kwargs: Any) -> None:
        self.calls.append(Call(hook, args, kwargs))

    record.__name__ = hook
    return record


class RecordingHandler(BaseCallbackHandler):
    """A sync handler that records every hook call, in order, thread-safely."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def record(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append(Call(hook, args, kwargs))

    def hooks(self, name: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if name is None or c.hook == name]

    def tokens(self) -> list[str]:
        return [c.token for c in self.hooks("on_llm_new_token")]


for _hook in HOOKS:
    setattr(RecordingHandler, _hook, _recording_hook(_hook))


class AsyncRecordingHandler(AsyncCallbackHandler):
    """An async handler that records every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def tokens(self) -> list[str]:
        return [c.token for c in self.calls if c.hook == "on_llm_new_token"]


for _hook in HOOKS:
    setattr(AsyncRecordingHandler, _hook, _async_recording_hook(_hook))


class FaultyHandler(BaseCallbackHandler):
    """Raises ``make_error()`` from each hook in ``hooks`` (all hooks by default)."""

    def __init__(
        self,
        make_error: Callable[[], BaseException] = lambda: ValueError("handler failure"),
        hooks: Iterable[str] = HOOKS,
        raise_error: bool = True,
    ) -> None:
        self.make_error = make_error
        self.failing = frozenset(hooks)
        self.raise_error = raise_error
        self.calls = 0

    def _fail(self, hook: str) -> None:
        self.calls += 1
        if hook in self.failing:
            raise self.make_error()


def _faulty_hook(hook: str) -> Callable[..., None]:
    def fail(self: FaultyHandler, *args: Any, **kwargs: Any) -> None:
        self._fail(hook)

    fail.__name__ = hook
    return fail


for _hook in HOOKS:
    setattr(FaultyHandler, _hook, _faulty_hook(_hook))


class BlockingHandler(RecordingHandler):
    """Records events, but blocks in ``hook`` until ``release()`` (a hung log sink)."""

    def __init__(self, hook: str = "on_llm_new_token", after: int = 0) -> None:
        if hook not in HOOKS:
            raise ValueError(f"BlockingHandler(hook=...) must be one of {HOOKS}, got {hook!r}")
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.block_hook = hook
        self.after = after
        self._seen = 0

    def release(self) -> None:
        self.gate.set()

    def _block_maybe(self, hook: str) -> None:
        if hook != self.block_hook:
            return
        self._seen += 1
        if self._seen > self.after:
            self.entered.set()
            self.gate.wait()


def _blocking_hook(hook: str) -> Callable[..., None]:
    def block_then_record(self: BlockingHandler, *args: Any, **kwargs: Any) -> None:
        self._block_maybe(hook)
        self.record(hook, args, kwargs)

    block_then_record.__name__ = hook
    return block_then_record


for _hook in HOOKS:  # whichever hook was asked for blocks; every hook is recorded
    setattr(BlockingHandler, _hook, _blocking_hook(_hook))


def fake_chat_model(tokens: int = 20, replies: int = 1) -> GenericFakeChatModel:
    """A ``GenericFakeChatModel`` that streams ``tokens`` words (and the spaces between).

    It answers ``replies`` times; each stream, invoke or batch item takes one.
    """
    text = " ".join(f"w{i}" for i in range(tokens))
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)] * replies))


def assert_accounted(stats: Stats) -> None:
    """Assert the accounting invariant of a flushed handler."""
    outcomes = stats.delivered + stats.failed + stats.dropped + stats.skipped
    assert stats.pending == 0, f"{stats.pending} events still pending: {stats!r}"
    assert stats.emitted == outcomes, f"emitted {stats.emitted} != outcomes {outcomes}: {stats!r}"


def wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def async_wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
) -> bool:
    """``wait_until`` for async tests: sleeps without blocking the loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


class FakeClock:
    """A monotonic clock that moves only when told to, or by ``step`` at every reading.

    Give it to a hardened handler with ``use_clock`` to test breaker resets and
    log-summary windows without sleeping.
    """

    def __init__(self, start: float = 1000.0, step: float = 0.0) -> None:
        self.now = start
        self.step = step
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += self.step
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def use_clock(handler: BaseCallbackHandler, clock: Callable[[], float]) -> None:
    """Make a hardened handler's breaker, log windows and stall reports read ``clock``."""
    from ._hardened import engine_of

    for member in engine_of(handler).family():
        member.observer.set_clock(clock)


def options_of(handler: BaseCallbackHandler) -> Options:
    """The validated options a hardened handler runs with (what ``harden`` resolved)."""
    from ._hardened import engine_of

    return engine_of(handler).options


def worker_threads() -> int:
    """Live delivery worker threads in this process (0 once idle workers have exited)."""
    from ._workers import worker_threads as count

    return count()


def retire_idle_workers(timeout: float = 10.0) -> bool:
    """Let idle delivery workers exit now, as they would after a quiet spell.

    For tests of what the first event after a quiet spell costs. True once no
    worker is left within ``timeout``; the usual idle time is restored after.
    """
    from ._workers import pool

    workers = pool()
    usual = workers.idle_exit
    workers.idle_exit = 0.01
    try:
        with workers.lock:
            workers.cond.notify_all()
        return wait_until(lambda: worker_threads() == 0, timeout)
    finally:
        workers.idle_exit = usual
