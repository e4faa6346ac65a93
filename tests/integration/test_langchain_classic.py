"""langchain-classic's ``AsyncIteratorCallbackHandler`` hardened yields every token, in order.

The documented pattern: one task runs the model with the handler attached, the caller
iterates ``handler.aiter()``. The handler's hooks put tokens on an ``asyncio.Queue`` and
set an ``asyncio.Event``; hardened (inline in auto mode) it must feed the iterator exactly
as it does bare: same tokens, same order, none lost, over repeated fast bursts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tests._imports import import_or_skip, require_langchain_core

require_langchain_core("1.0", "langchain-classic 1.x")
streaming_aiter = import_or_skip("langchain_classic.callbacks.streaming_aiter")

from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402

import safecallbacks  # noqa: E402
from tests.integration._compare import assert_same  # noqa: E402
from tests.integration._models import AsyncStreamingChatModel  # noqa: E402

AsyncIteratorCallbackHandler = streaming_aiter.AsyncIteratorCallbackHandler

RUNS = 15
WORDS = 200


class BurstChatModel(AsyncStreamingChatModel):
    """A native async stream with no pacing; ``streaming=True`` makes ``agenerate`` stream."""

    streaming: bool = False


def burst_text(run: int) -> str:
    return " ".join(f"r{run}w{i}" for i in range(WORDS))


def expected_tokens(run: int) -> list[str]:
    return [token for token in re.split(r"(\s)", burst_text(run)) if token]


def burst_model() -> BurstChatModel:
    return BurstChatModel(
        messages=iter([AIMessage(content=burst_text(run)) for run in range(RUNS)]),
        streaming=True,
    )


async def via_ainvoke(model: BurstChatModel, handler: Any) -> str:
    result = await model.ainvoke([HumanMessage("go")], config={"callbacks": [handler]})
    return str(result.content)


async def via_agenerate(model: BurstChatModel, handler: Any) -> str:
    result = await model.agenerate([[HumanMessage("go")]], callbacks=[handler])
    return result.generations[0][0].text


Producer = Callable[[BurstChatModel, Any], Coroutine[Any, Any, str]]


async def consume(producer: Producer, make_handler: Callable[[], Any]) -> list[dict[str, Any]]:
    """RUNS runs of the documented pattern; per run: the tokens aiter() gave and the result."""
    model = burst_model()
    runs: list[dict[str, Any]] = []
    for _ in range(RUNS):
        handler = make_handler()
        task: asyncio.Task[str] = asyncio.create_task(producer(model, handler))
        tokens: list[str] = []

        async def drain(handler: Any = handler, tokens: list[str] = tokens) -> None:
            async for token in handler.aiter():
                tokens.append(token)

        # Bounded: a lost on_llm_end would leave aiter() waiting forever.
        await asyncio.wait_for(drain(), timeout=10.0)
        result = await asyncio.wait_for(task, timeout=10.0)
        runs.append({"tokens": tokens, "result": result})
    return runs


@pytest.mark.parametrize("producer", [via_ainvoke, via_agenerate], ids=["ainvoke", "agenerate"])
async def test_aiter_yields_every_token_in_order(producer: Producer) -> None:
    bare = await consume(producer, AsyncIteratorCallbackHandler)
    for run, recorded in enumerate(bare):
        assert recorded["tokens"] == expected_tokens(run), f"bare lost tokens in run {run}"

    made: list[Any] = []

    def make_hardened() -> Any:
        handler = safecallbacks.harden(AsyncIteratorCallbackHandler())
        made.append(handler)
        assert isinstance(handler, AsyncIteratorCallbackHandler)
        assert safecallbacks.stats(handler).mode == "inline"
        return handler

    try:
        safe = await consume(producer, make_hardened)
    finally:
        for handler in made:
            await safecallbacks.aclose(handler, timeout=5.0)

    for run, recorded in enumerate(safe):
        missing = len(expected_tokens(run)) - len(recorded["tokens"])
        assert recorded["tokens"] == expected_tokens(run), (
            f"hardened run {run}: {missing} tokens missing or out of order"
        )
    assert_same(bare, safe)
    for handler in made:
        stats = safecallbacks.stats(handler)
        assert stats.failed == 0 and stats.dropped == 0, stats
