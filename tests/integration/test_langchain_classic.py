"""langchain-classic's ``AsyncIteratorCallbackHandler`` hardened yields every token, in order.

The documented pattern: one task runs the model with the handler attached, the caller
iterates ``handler.aiter()``. The handler's hooks put tokens on an ``asyncio.Queue`` and
set an ``asyncio.Event``; hardened (inline in auto mode) it must feed the iterator exactly
as it does bare: same tokens, same order, none lost, over repeated fast bursts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from tests._imports import import_or_skip, require_langchain_core

require_langchain_core("1.0", "langchain-classic 1.x")
streaming_aiter = import_or_skip("langchain_classic.callbacks.streaming_aiter")

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun  # noqa: E402
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage  # noqa: E402
from langchain_core.outputs import ChatGenerationChunk  # noqa: E402

import safecallbacks  # noqa: E402
from tests.integration._compare import assert_same  # noqa: E402

AsyncIteratorCallbackHandler = streaming_aiter.AsyncIteratorCallbackHandler

RUNS = 15
WORDS = 200


class BurstChatModel(GenericFakeChatModel):
    """GenericFakeChatModel with a native async stream, as provider models have.

    Tokens go out as fast as the loop allows: ``on_llm_new_token`` is awaited on the
    emitting loop before each chunk, with no pacing.
    """

    streaming: bool = False

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop=stop, run_manager=None, **kwargs):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


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
