"""Guarantee 3, "nothing is lost silently": flush tells the truth, every event is accounted."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from langchain_core.callbacks import CallbackManager, CallbackManagerForLLMRun
from langchain_core.messages import HumanMessage

import safecallbacks
from safecallbacks._dispatch import Barrier
from safecallbacks._hardened import engine
from safecallbacks.testing import BlockingHandler, wait_until


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
