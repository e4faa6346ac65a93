"""Guarantee 3, "nothing is lost silently": flush tells the truth, every event is accounted."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
import weakref
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import HumanMessage

import safecallbacks
from safecallbacks._dispatch import Barrier
from safecallbacks._hardened import engine
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    RecordingHandler,
    fake_chat_model,
    wait_until,
)


def llm_run(handler: Any) -> CallbackManagerForLLMRun:
    manager = CallbackManager.configure(inheritable_callbacks=[handler])
    return manager.on_chat_model_start({"name": "t"}, [[HumanMessage("hi")]])[0]


def barriers_queued(handler: Any) -> int:
    return sum(1 for e in list(engine(handler)._thread_lane.queue) if isinstance(e, Barrier))


def test_drop_oldest_never_pops_a_flush_barrier_while_an_event_is_in_delivery() -> None:
    handler = safecallbacks.harden(
        BlockingHandler(), mode="offload", max_queue=4, on_full="drop_oldest", breaker=None
    )
    run = llm_run(handler)
    run.on_llm_new_token("first")  # delivered, and hangs in the handler
    assert handler.entered.wait(5.0)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(safecallbacks.flush(handler, 0.5)))
    flusher.start()
    try:
        assert wait_until(lambda: barriers_queued(handler) == 1, 5.0)
        for index in range(10):  # overflow: the oldest events make room, the barrier stays
            run.on_llm_new_token(f"t{index}")
        flusher.join(5.0)
        assert result == [False], "flush returned True while an event was still in delivery"
        stats = safecallbacks.stats(handler)
        assert stats.pending >= 1 and stats.dropped == 6
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert (stats.emitted, stats.delivered, stats.dropped, stats.pending) == (12, 6, 6, 0)


def test_a_flush_barrier_never_costs_an_event_its_place() -> None:
    handler = safecallbacks.harden(BlockingHandler(), mode="offload", max_queue=3, breaker=None)
    run = llm_run(handler)
    run.on_llm_new_token("in delivery")
    assert handler.entered.wait(5.0)
    for index in range(2):
        run.on_llm_new_token(f"queued {index}")
    try:
        assert safecallbacks.flush(handler, 0.05) is False  # leaves a barrier in the queue
        run.on_llm_new_token("third queued event: room for it, the barrier takes none")
        assert safecallbacks.stats(handler).dropped == 0
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert (stats.delivered, stats.dropped) == (5, 0)
    assert [c.kwargs.get("token", c.args[0] if c.args else None) for c in handler.calls][
        -1
    ] == "third queued event: room for it, the barrier takes none"


def test_blocking_handler_blocks_the_hook_it_was_asked_to() -> None:
    handler = safecallbacks.harden(BlockingHandler(hook="on_llm_end"), mode="offload")
    run = llm_run(handler)
    run.on_llm_new_token("t")
    from langchain_core.outputs import LLMResult

    run.on_llm_end(LLMResult(generations=[[]]))
    try:
        assert handler.entered.wait(5.0)
        assert [c.hook for c in handler.calls] == ["on_chat_model_start", "on_llm_new_token"]
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)
    assert uuid  # the run ids are LangChain's own


# --- shutdown is not the handler's failure -------------------------------------------


class HangsAsync(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.started = 0

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.started += 1
        await asyncio.Event().wait()  # never returns: only its loop's shutdown ends it


def test_an_event_cut_off_by_loop_shutdown_is_dropped_not_failed() -> None:
    handler = safecallbacks.harden(HangsAsync(), mode="offload", exit_timeout=0.2, breaker=None)

    async def request() -> None:
        async for _ in fake_chat_model(3).astream("hi", config={"callbacks": [handler]}):
            pass

    asyncio.run(request())  # shuts its loop down with the delivery still hanging
    stats = safecallbacks.stats(handler)
    assert handler.started >= 1
    assert stats.failed == 0 and dict(stats.errors) == {}, stats
    assert stats.pending == 0 and stats.dropped == stats.emitted - stats.delivered > 0, stats


# --- one snapshot, one state -----------------------------------------------------------


class FailsSlowly(BaseCallbackHandler):
    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        time.sleep(0.0005)  # slow enough that snapshots land in the middle of a batch
        raise ValueError("a failing sink")


def test_stats_agree_with_themselves_during_a_backlog() -> None:
    handler = safecallbacks.harden(FailsSlowly(), mode="offload", breaker=None)
    run = llm_run(handler)
    for index in range(300):
        run.on_llm_new_token(f"t{index}")
    highs: list[int] = []
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        stats = safecallbacks.stats(handler)
        highs.append(stats.queue_high_water)
        assert sum(stats.errors.values()) == stats.failed, stats
        rows = stats.hooks.values()
        assert sum(r.failed for r in rows) == stats.failed
        assert sum(r.delivered for r in rows) == stats.delivered
        if stats.failed == 300:
            break
    assert highs == sorted(highs), "queue_high_water fell"
    assert safecallbacks.flush(handler, 10.0)
    stats = safecallbacks.stats(handler)
    assert all(row.pending == 0 for row in stats.hooks.values()) and stats.pending == 0
    assert stats.failed == 300 and dict(stats.errors) == {"ValueError": 300}


async def test_right_after_aflush_no_hook_row_is_pending() -> None:
    handler = safecallbacks.harden(RecordingHandler(), mode="offload")
    for _ in range(20):
        async for _ in fake_chat_model(5).astream("hi", config={"callbacks": [handler]}):
            pass
        assert await safecallbacks.aflush(handler, 5.0)
        stats = safecallbacks.stats(handler)
        assert stats.pending == 0
        assert not [h for h, row in stats.hooks.items() if row.pending], stats


# --- closed loops are let go -----------------------------------------------------------


def test_a_shared_async_handler_does_not_keep_closed_loops_alive() -> None:
    handler = safecallbacks.harden(AsyncRecordingHandler(), mode="offload")
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def request() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async for _ in fake_chat_model(2).astream("hi", config={"callbacks": [handler]}):
            pass

    for _ in range(200):
        asyncio.run(request())
    gc.collect()
    alive = [ref for ref in loops if ref() is not None]
    assert len(alive) <= 1, f"{len(alive)} closed loops still alive"
    stats = safecallbacks.stats(handler)
    assert stats.pending == 0 and stats.emitted == stats.delivered + stats.dropped
