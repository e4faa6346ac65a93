"""A fake chat model that streams at a provider's pace.

``PacedFakeChatModel`` behaves like ``GenericFakeChatModel`` from langchain-core (it goes
through LangChain's normal streaming machinery and reports every chunk to the run
manager, so ``on_llm_new_token`` fires for each one), but it waits ``interval`` seconds
before each chunk the way a real provider does. The sync path waits with ``time.sleep``,
the async path with ``asyncio.sleep``, so an async stream leaves its event loop free
between tokens, exactly like a network read would.

Used by the demo and the benchmarks; it needs nothing beyond langchain-core.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import (
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import Field

__all__ = ["PacedFakeChatModel", "make_tokens"]

_HAS_CHUNK_POSITION = "chunk_position" in AIMessageChunk.model_fields


def make_tokens(count: int, word: str = "tok") -> list[str]:
    """Return ``count`` tokens such as ``["tok0", " tok1", " tok2", ...]``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    return [f"{word}{i}" if i == 0 else f" {word}{i}" for i in range(count)]


class PacedFakeChatModel(BaseChatModel):
    """Streams ``tokens`` one chunk at a time, one every ``interval`` seconds.

    Every call (``invoke``, ``stream``, ``astream``, ``batch``...) produces the same
    tokens; ``invoke`` and ``ainvoke`` stream internally, so handlers see
    ``on_llm_new_token`` for every chunk on those paths too.

    Example::

        model = PacedFakeChatModel(tokens=make_tokens(200), interval=0.005)
        for chunk in model.stream("hi", config={"callbacks": [handler]}):
            ...
    """

    tokens: list[str] = Field(default_factory=lambda: make_tokens(20))
    """The chunks to emit, in order. Their concatenation is the final message."""

    interval: float = Field(default=0.005, ge=0.0)
    """Seconds to wait before each chunk (0 means no pause at all)."""

    @property
    def _llm_type(self) -> str:
        return "paced-fake-chat-model"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"interval": self.interval, "n_tokens": len(self.tokens)}

    def _chunk(self, index: int) -> ChatGenerationChunk:
        message = AIMessageChunk(content=self.tokens[index])
        if _HAS_CHUNK_POSITION and index == len(self.tokens) - 1:
            message.chunk_position = "last"
        return ChatGenerationChunk(message=message)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for index, token in enumerate(self.tokens):
            if self.interval > 0:
                time.sleep(self.interval)
            chunk = self._chunk(index)
            if run_manager is not None:
                run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for index, token in enumerate(self.tokens):
            if self.interval > 0:
                await asyncio.sleep(self.interval)
            chunk = self._chunk(index)
            if run_manager is not None:
                await run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
