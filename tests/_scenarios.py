"""A real LangChain run that fires (nearly) every callback hook, sync or async.

``run_sync``/``run_async`` return a comparable outcome (the streamed chunks and
any exception), so a test can check that attaching a handler changed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from langchain_core.agents import AgentAction, AgentFinish
from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForRetrieverRun,
    BaseCallbackHandler,
    CallbackManagerForChainRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.documents import Document
from langchain_core.language_models import FakeListLLM, GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from tenacity import RetryCallState, Retrying

TOKENS = 12
REPLY = " ".join(f"w{i}" for i in range(TOKENS))


class Shelf(BaseRetriever):
    """A tiny retriever; fails on the query "broken" so error hooks fire too."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        if query == "broken":
            raise LookupError("shelf is broken")
        return [Document(page_content=f"doc about {query}")]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        return self._get_relevant_documents(query, run_manager=run_manager)  # type: ignore[arg-type]


@tool
def lookup(query: str) -> str:
    """Look a word up; fails on "broken"."""
    if query == "broken":
        raise LookupError("lookup failed")
    return query.upper()


class BrokenModel(GenericFakeChatModel):
    """A chat model whose every call fails, so on_llm_error fires."""

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("model is down")


def _retry_state() -> RetryCallState:
    return RetryCallState(Retrying(), fn=None, args=(), kwargs={})


def _chat_model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=REPLY)]))


def _fail(_: str) -> str:
    raise KeyError("nested chain failed")


def _side_trip(
    question: str, run_manager: CallbackManagerForChainRun, config: RunnableConfig
) -> str:
    run_manager.on_text("thinking")
    run_manager.on_retry(_retry_state())
    run_manager.on_agent_action(AgentAction(tool="lookup", tool_input=question, log=""))
    run_manager.on_agent_finish(AgentFinish(return_values={"output": question}, log=""))
    dispatch_custom_event("progress", {"step": 1}, config=config)
    Shelf().invoke(question, config)
    lookup.invoke({"query": question}, config)
    FakeListLLM(responses=["plain llm"]).invoke(question, config)
    broken_calls: list[Callable[[], Any]] = [
        lambda: Shelf().invoke("broken", config),
        lambda: lookup.invoke({"query": "broken"}, config),
        lambda: BrokenModel(messages=iter([])).invoke("x", config),
        lambda: RunnableLambda(_fail).invoke("x", config),
    ]
    for broken in broken_calls:
        with contextlib.suppress(LookupError, ConnectionError, KeyError):
            broken()
    return question


async def _aside_trip(
    question: str, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
) -> str:
    await run_manager.on_text("thinking")
    await run_manager.on_retry(_retry_state())
    await run_manager.on_agent_action(AgentAction(tool="lookup", tool_input=question, log=""))
    await run_manager.on_agent_finish(AgentFinish(return_values={"output": question}, log=""))
    await adispatch_custom_event("progress", {"step": 1}, config=config)
    await Shelf().ainvoke(question, config)
    await lookup.ainvoke({"query": question}, config)
    await FakeListLLM(responses=["plain llm"]).ainvoke(question, config)
    broken_calls: list[Callable[[], Any]] = [
        lambda: Shelf().ainvoke("broken", config),
        lambda: lookup.ainvoke({"query": "broken"}, config),
        lambda: BrokenModel(messages=iter([])).ainvoke("x", config),
        lambda: RunnableLambda(_fail).ainvoke("x", config),
    ]
    for broken in broken_calls:
        with contextlib.suppress(LookupError, ConnectionError, KeyError):
            await broken()
    return question


def kitchen_sink() -> Any:
    """Chain: a step that fires text/retry/agent/custom/retriever/tool hooks, then a model."""
    return RunnableLambda(_side_trip, afunc=_aside_trip) | _chat_model()


def run_sync(handlers: list[BaseCallbackHandler] | dict[str, Any]) -> list[str]:
    config = handlers if isinstance(handlers, dict) else {"callbacks": handlers}
    return [chunk.content for chunk in kitchen_sink().stream("question", config=config)]


async def run_async(handlers: list[BaseCallbackHandler] | dict[str, Any]) -> list[str]:
    config = handlers if isinstance(handlers, dict) else {"callbacks": handlers}
    return [chunk.content async for chunk in kitchen_sink().astream("question", config=config)]


def run(path: str, handlers: list[BaseCallbackHandler] | dict[str, Any]) -> list[str]:
    """Run the kitchen sink on the "sync" or "async" path from synchronous test code."""
    if path == "sync":
        return run_sync(handlers)
    return asyncio.run(run_async(handlers))


def new_run_id() -> str:
    return str(uuid4())
