"""Fake chat models the integration tests share: ``GenericFakeChatModel`` made provider-like.

- ``AsyncStreamingChatModel``: a native async stream, as provider models have (the stock
  model streams ``astream`` through ``_stream`` in an executor thread): each chunk of
  ``_stream``, after ``delay`` seconds, is reported by awaiting ``on_llm_new_token`` on
  the emitting loop.
- ``MetadataChatModel``: that, with chunks that carry the message's usage and response
  metadata on the last one, as real provider models put them (the stock ``_stream`` drops
  ``usage_metadata``/``response_metadata``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk


class AsyncStreamingChatModel(GenericFakeChatModel):
    """GenericFakeChatModel whose ``_astream`` is native, one chunk every ``delay`` seconds.

    ``delay`` 0 sends tokens out as fast as the loop allows: ``on_llm_new_token`` is
    awaited on the emitting loop before each chunk, with no pacing.
    """

    delay: float = 0.0

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop=stop, run_manager=None, **kwargs):
            if self.delay:
                await asyncio.sleep(self.delay)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


class MetadataChatModel(AsyncStreamingChatModel):
    """Chunks split on whitespace; the last carries the message's usage and model name."""

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        message = self._generate(messages, stop=stop, **kwargs).generations[0].message
        assert isinstance(message, AIMessage)
        assert isinstance(message.content, str)
        tokens = re.split(r"(\s)", message.content)
        for index, token in enumerate(tokens):
            last = index == len(tokens) - 1
            chunk = ChatGenerationChunk(
                message=AIMessageChunk(
                    content=token,
                    usage_metadata=message.usage_metadata if last else None,
                    response_metadata=dict(message.response_metadata) if last else {},
                )
            )
            if run_manager:
                run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk
