"""Fake chat models that report token usage the ways langchain-community's cost collectors read it.

- ``OpenAICallbackHandler`` reads ``usage_metadata`` and ``response_metadata["model_name"]``
  on the message (what ``langchain-openai`` sends, streamed or not), else the legacy
  ``llm_output["token_usage"]`` / ``llm_output["model_name"]`` of a non-streamed call;
- ``BedrockAnthropicTokenUsageCallbackHandler`` reads ``llm_output["usage"]`` and
  ``llm_output["model_id"]`` only.

``llm_output`` reaches ``on_llm_end`` only from ``_generate`` (``invoke``/``ainvoke``):
langchain-core's streaming paths end a run with ``LLMResult(generations=...)`` alone.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatResult

from tests.integration._models import MetadataChatModel

PROMPT_TOKENS = 31
CACHED_TOKENS = 11
COMPLETION_TOKENS = 20
REASONING_TOKENS = 5
TOTAL_TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS  # 51 a call: 51, 102, 153 in a row

OPENAI_MODEL = "gpt-4o-mini"  # priced in langchain-community's table, cached tokens too
BEDROCK_MODEL = "us.anthropic.claude-3-haiku-20240307-v1:0"  # a cross-region profile id


class UsageChatModel(MetadataChatModel):
    """``MetadataChatModel`` whose ``_generate`` also returns ``llm_output``, as providers do."""

    llm_output: dict[str, Any] | None = None

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        return ChatResult(generations=result.generations, llm_output=self.llm_output)


def _replies(calls: int, **fields: Any) -> list[AIMessage]:
    return [AIMessage(content=f"it costs {i} cents", **fields) for i in range(calls)]


def openai_model(calls: int) -> UsageChatModel:
    """Usage on the message (``usage_metadata`` + ``model_name``), streamed or not."""
    usage = {
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": COMPLETION_TOKENS,
        "total_tokens": TOTAL_TOKENS,
        "input_token_details": {"cache_read": CACHED_TOKENS},
        "output_token_details": {"reasoning": REASONING_TOKENS},
    }
    return UsageChatModel(
        messages=iter(
            _replies(calls, usage_metadata=usage, response_metadata={"model_name": OPENAI_MODEL})
        )
    )


def openai_legacy_model(calls: int) -> UsageChatModel:
    """Usage only in ``llm_output["token_usage"]``, as pre-``usage_metadata`` models report it."""
    return UsageChatModel(
        messages=iter(_replies(calls)),
        llm_output={
            "token_usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": TOTAL_TOKENS,
            },
            "model_name": OPENAI_MODEL,
        },
    )


def bedrock_model(calls: int) -> UsageChatModel:
    """Usage in ``llm_output["usage"]`` and a Bedrock ``model_id``, as ``ChatBedrock`` has it."""
    return UsageChatModel(
        messages=iter(_replies(calls)),
        llm_output={
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": TOTAL_TOKENS,
            },
            "model_id": BEDROCK_MODEL,
        },
    )
