"""Guarantee 2, "nothing stalls": the emitting side only records, in memory."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from langchain_core.callbacks import BaseCallbackHandler

import safecallbacks
from safecallbacks import _dispatch
from safecallbacks._paced import PacedFakeChatModel, make_tokens
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    RecordingHandler,
    fake_chat_model,
    wait_until,
)

SLOW_LOG_SECONDS = 0.5


@pytest.fixture
def slow_log_sink() -> Iterator[list[str]]:
    """structlog configured with a sink that needs half a second per line."""
    written: list[str] = []

    def slow(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        time.sleep(SLOW_LOG_SECONDS)
        written.append(str(event_dict.get("event")))
        raise structlog.DropEvent

    structlog.configure(processors=[slow])
    try:
        yield written
    finally:
        structlog.reset_defaults()


class FlagRaises(BaseCallbackHandler):
    @property
    def ignore_llm(self) -> bool:
        raise RuntimeError("a broken ignore flag")

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        pass


def test_logging_never_happens_on_the_emitting_thread(slow_log_sink: list[str]) -> None:
    overflowing = safecallbacks.harden(BlockingHandler(), mode="offload", max_queue=2)
    closed = safecallbacks.harden(RecordingHandler(), mode="offload")
    safecallbacks.close(closed)
    flag = safecallbacks.harden(FlagRaises(), mode="offload")
    stamps: list[float] = []
    try:
        callbacks = {"callbacks": [overflowing, closed, flag]}
        for _ in fake_chat_model(30).stream("hi", config=callbacks):
            stamps.append(time.monotonic())
    finally:
        overflowing.release()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < SLOW_LOG_SECONDS / 2, (
        f"longest gap {max(gaps):.3f}s: a log on the token path"
    )
    assert safecallbacks.flush(overflowing, 10.0) and safecallbacks.flush(flag, 10.0)
    safecallbacks.stats(closed)  # a stats read writes what is still queued
    assert wait_until(
        lambda: {"events_dropped", "ignore_flag_failed"} <= set(slow_log_sink), 10.0
    ), slow_log_sink


def test_a_paced_async_stream_costs_one_consumer_task_not_one_per_token() -> None:
    handler = safecallbacks.harden(AsyncRecordingHandler(), mode="offload")
    consumers: list[str] = []

    async def stream() -> None:
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            if getattr(coro, "__qualname__", "").endswith("_consume"):
                consumers.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)
        model = PacedFakeChatModel(tokens=make_tokens(100), interval=0.002)
        async for _ in model.astream("hi", config={"callbacks": [handler]}):
            pass
        assert await safecallbacks.aflush(handler, 5.0)

    asyncio.run(stream())
    assert len(handler.calls) == 102
    assert len(consumers) <= 3, f"{len(consumers)} consumer tasks for 100 paced tokens"


def test_the_first_event_after_idle_workers_left_starts_no_thread_on_the_emitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = safecallbacks.harden(RecordingHandler(), mode="offload")
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    assert safecallbacks.flush(handler, 5.0)
    pool = _dispatch.pool()
    monkeypatch.setattr(pool, "idle_exit", 0.05)  # let the idle workers go now
    with pool.lock:
        pool.cond.notify_all()
    assert wait_until(lambda: _dispatch.worker_threads() == 0, 10.0)

    started_by: list[str] = []
    original_start = threading.Thread.start

    def recording_start(self: threading.Thread) -> None:
        started_by.append(threading.current_thread().name)
        original_start(self)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    emitter = threading.current_thread().name
    for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
        pass
    assert safecallbacks.flush(handler, 5.0)
    assert emitter not in started_by, started_by
    assert safecallbacks.stats(handler).delivered == 14
