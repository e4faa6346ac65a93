"""langchain-community's cost collectors hardened count exactly what they count bare.

``get_openai_callback()`` / ``OpenAICallbackHandler`` and ``get_bedrock_anthropic_callback()``
/ ``BedrockAnthropicTokenUsageCallbackHandler`` add up tokens, cost and requests in
``on_llm_end``; users read ``cb.total_tokens``, ``cb.total_cost``... right after each call.
Three calls in a row through ``prompt | model | StrOutputParser`` must read 51, 102, 153
hardened as bare, never one call behind (0, 51, 102), and the same again after a flush.

The handler is attached the ways users attach it: passed in ``config`` (explicitly hardened
with ``harden()``, or hardened by ``install()``), or registered by the context manager,
which langchain-core's configure hook adds to every callback manager built inside the
``with`` block (``install()`` hardens it there; ``harden(cb)`` hardens it in place).
An application's subclass of ``OpenAICallbackHandler`` (its own ``on_llm_end``) is
checked the same way: offloaded or not, its totals are complete when the call returns.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig

from tests._imports import import_or_skip, require_langchain_core

require_langchain_core("1.4", "langchain-community 0.4")

with warnings.catch_warnings():
    # The package announces its sunset on import; it is still what these users run.
    warnings.simplefilter("ignore", DeprecationWarning)
    manager = import_or_skip("langchain_community.callbacks.manager")

import safecallbacks  # noqa: E402
from tests.integration._community_models import (  # noqa: E402
    TOTAL_TOKENS,
    bedrock_model,
    openai_legacy_model,
    openai_model,
)
from tests.integration._compare import assert_same  # noqa: E402

OpenAICallbackHandler = manager.OpenAICallbackHandler
BedrockHandler = manager.BedrockAnthropicTokenUsageCallbackHandler

CALLS = 3

# What users read off the handler; the Bedrock one has no cached/reasoning counts.
FIELDS = (
    "total_tokens",
    "prompt_tokens",
    "prompt_tokens_cached",
    "completion_tokens",
    "reasoning_tokens",
    "successful_requests",
    "total_cost",
)


class CostLog(OpenAICallbackHandler):  # type: ignore[misc,valid-type]
    """An application's subclass, as users write one: it logs the running cost per call.

    Its hook is the application's own code (not an installed library's), so it is the
    case the auto rule offloads; its totals must still be complete when a call returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        super().on_llm_end(response, **kwargs)
        self.log.append(f"{self.successful_requests}: {self.total_tokens} tokens")


@dataclass(frozen=True)
class Collector:
    """One cost collector: its class, its context manager and a model that reports to it."""

    name: str
    handler_class: type[BaseCallbackHandler]
    context: Callable[[], AbstractContextManager[Any]] | None  # None: config only
    model: Callable[[int], BaseChatModel]


OPENAI = Collector("openai", OpenAICallbackHandler, manager.get_openai_callback, openai_model)
OPENAI_LEGACY = Collector(
    "openai-llm_output", OpenAICallbackHandler, manager.get_openai_callback, openai_legacy_model
)
SUBCLASS = Collector("openai-subclass", CostLog, None, openai_model)
BEDROCK = Collector(
    "bedrock", BedrockHandler, manager.get_bedrock_anthropic_callback, bedrock_model
)


def totals(handler: Any) -> dict[str, Any]:
    """The counters as a user reads them; cost also in nano-USD (``scrub`` rounds floats
    to 6 decimals, which would hide a missing call's ~1.6e-05 USD)."""
    found = {name: getattr(handler, name) for name in FIELDS if hasattr(type(handler), name)}
    found["total_cost_nano_usd"] = found["total_cost"] * 1e9
    if isinstance(handler, CostLog):
        found["log"] = list(handler.log)
    return found


def chain(model: BaseChatModel) -> Runnable[Any, str]:
    prompt = ChatPromptTemplate.from_messages([("human", "what does {item} cost?")])
    return prompt | model.with_config(run_name="model") | StrOutputParser()


@contextmanager
def armed(arm: str) -> Iterator[None]:
    """``install()`` for the install arm (undone afterwards); nothing for bare and harden."""
    if arm != "install":
        yield
        return
    safecallbacks.install()
    try:
        yield
    finally:
        safecallbacks.uninstall()


@contextmanager
def attached(
    collector: Collector, attach: str, prepare: Callable[[Any], Any]
) -> Iterator[tuple[Any, RunnableConfig]]:
    """The handler users read and the config each call gets, for one way of attaching it.

    ``prepare`` is the identity bare and under ``install()``, ``harden`` for the harden arm
    (in place: the context manager's context variable holds the very object hardened).
    """
    if attach == "config":
        handler = prepare(collector.handler_class())
        yield handler, {"callbacks": [handler]}
        return
    assert collector.context is not None
    with collector.context() as cb:
        handler = prepare(cb)
        # Also in config: the configure hook must not add it a second time (by identity).
        yield handler, {"callbacks": [handler]} if attach == "context+config" else {}


def run_sync(
    collector: Collector, style: str, attach: str, prepare: Callable[[Any], Any], hardened: bool
) -> dict[str, Any]:
    """CALLS calls in a row; the totals right after each, and after a flush (hardened)."""
    runnable = chain(collector.model(CALLS))
    outputs: list[str] = []
    seen: list[dict[str, Any]] = []
    with attached(collector, attach, prepare) as (handler, config):
        for i in range(CALLS):
            if style == "invoke":
                outputs.append(runnable.invoke({"item": i}, config=config))
            else:
                outputs.append("".join(runnable.stream({"item": i}, config=config)))
            seen.append(totals(handler))
        if hardened:
            assert safecallbacks.flush(handler, timeout=5.0), "pending events after 5 s"
        flushed = totals(handler)
    return {"outputs": outputs, "after_each_call": seen, "after_flush": flushed}


async def run_async(
    collector: Collector, style: str, attach: str, prepare: Callable[[Any], Any], hardened: bool
) -> dict[str, Any]:
    """``run_sync`` for ``ainvoke``/``astream`` (same task: the context variable is seen)."""
    runnable = chain(collector.model(CALLS))
    outputs: list[str] = []
    seen: list[dict[str, Any]] = []
    async with _attached_async(collector, attach, prepare) as (handler, config):
        for i in range(CALLS):
            if style == "ainvoke":
                outputs.append(await runnable.ainvoke({"item": i}, config=config))
            else:
                outputs.append("".join([c async for c in runnable.astream({"item": i}, config)]))
            seen.append(totals(handler))
        if hardened:
            assert await safecallbacks.aflush(handler, timeout=5.0), "pending events after 5 s"
        flushed = totals(handler)
    return {"outputs": outputs, "after_each_call": seen, "after_flush": flushed}


@asynccontextmanager
async def _attached_async(
    collector: Collector, attach: str, prepare: Callable[[Any], Any]
) -> AsyncIterator[tuple[Any, RunnableConfig]]:
    with attached(collector, attach, prepare) as found:
        yield found


def check_bare(collector: Collector, bare: dict[str, Any]) -> None:
    """The scenario itself works: bare counts every call once, at a non-zero cost."""
    tokens = [seen["total_tokens"] for seen in bare["after_each_call"]]
    assert tokens == [TOTAL_TOKENS * (i + 1) for i in range(CALLS)], f"{collector.name}: {tokens}"
    assert [seen["successful_requests"] for seen in bare["after_each_call"]] == [1, 2, 3]
    assert bare["after_each_call"][0]["total_cost"] > 0, "the model's price is unknown"


def cases(styles: list[str]) -> list[Any]:
    """(collector, style, attach) for every way each collector is used with these styles.

    ``llm_output`` only reaches ``on_llm_end`` through ``invoke``/``ainvoke`` (streams end
    with the generations alone), so the collectors reading it are not streamed: bare
    they would count nothing and the comparison would prove nothing.
    """
    found = []
    for style in styles:
        for attach in ("config", "context", "context+config"):
            found.append(pytest.param(OPENAI, style, attach, id=f"openai-{style}-{attach}"))
        found.append(pytest.param(SUBCLASS, style, "config", id=f"openai-subclass-{style}-config"))
        if style in ("invoke", "ainvoke"):
            for collector in (OPENAI_LEGACY, BEDROCK):
                for attach in ("config", "context"):
                    found.append(
                        pytest.param(
                            collector, style, attach, id=f"{collector.name}-{style}-{attach}"
                        )
                    )
    return found


def _preparer(arm: str, hardened: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return hardened if arm == "harden" else (lambda handler: handler)


@pytest.mark.parametrize("arm", ["harden", "install"])
@pytest.mark.parametrize(("collector", "style", "attach"), cases(["invoke", "stream"]))
def test_totals_right_after_each_call(
    hardened: Callable[[Any], Any], collector: Collector, style: str, attach: str, arm: str
) -> None:
    bare = run_sync(collector, style, attach, lambda handler: handler, hardened=False)
    check_bare(collector, bare)

    with armed(arm):
        safe = run_sync(collector, style, attach, _preparer(arm, hardened), hardened=True)

    assert_same(bare, safe)


@pytest.mark.parametrize("arm", ["harden", "install"])
@pytest.mark.parametrize(("collector", "style", "attach"), cases(["ainvoke", "astream"]))
async def test_totals_right_after_each_async_call(
    hardened: Callable[[Any], Any], collector: Collector, style: str, attach: str, arm: str
) -> None:
    bare = await run_async(collector, style, attach, lambda handler: handler, hardened=False)
    check_bare(collector, bare)

    with armed(arm):
        safe = await run_async(collector, style, attach, _preparer(arm, hardened), hardened=True)

    assert_same(bare, safe)
