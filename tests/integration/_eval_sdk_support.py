"""deepeval's LangChain integration, run locally: the chain, the scenarios and what is read.

deepeval (4.x) builds its traces in a process-wide ``trace_manager`` and keeps the
current trace and span in ContextVars (``current_trace_context``, ``current_span_context``)
that its hooks write and its user API reads: ``update_current_span`` in a step,
deepeval's own ``@tool`` wrapper (it sets the metric collection on the span the hook
opened), ``@observe`` around the call (LangChain spans nest under the observed span),
and ``next_llm_span``/``next_agent_span`` staged around the call (the hooks pop them).

Nothing leaves the process: with ``trace_testing_manager.test_name`` set (deepeval's own
trace-testing seam), ``TraceManager.end_trace`` stores the finished trace's API body
(``TraceApi``, the JSON it would post to Confident AI) in ``trace_testing_manager.test_dict``
instead of queueing it for posting. That body is what is compared, as a span tree.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from deepeval.integrations.langchain import CallbackHandler
from deepeval.integrations.langchain import tool as deepeval_tool
from deepeval.tracing import (
    current_span_context,
    current_trace_context,
    next_agent_span,
    next_llm_span,
    observe,
    trace_manager,
    update_current_span,
    update_current_trace,
)
from deepeval.tracing.trace_test_manager import trace_testing_manager
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import tool as langchain_tool

from ._compare import VOLATILE_KEYS
from ._models import MetadataChatModel

REPLY = "the quick brown fox"
USAGE = {"input_tokens": 4, "output_tokens": 9, "total_tokens": 13}
TRACE_FIELDS: dict[str, Any] = {
    "name": "eval-trace",
    "tags": ["eval-tag"],
    "metadata": {"tenant": "acme"},
    "thread_id": "thread-1",
    "user_id": "user-7",
}
CHAIN_SPANS = [
    "RunnableSequence",
    "ChatPromptTemplate",
    "MetadataChatModel",
    "StrOutputParser",
    "annotate",
    "shout",
]
OBSERVED_SPAN = "outer"

# The API body's own ids and times (camelCase), besides the shared ones.
VOLATILE = VOLATILE_KEYS | {"uuid", "parentUuid", "traceUuid", "startTime", "endTime"}
SPAN_LISTS = ("agentSpans", "llmSpans", "retrieverSpans", "toolSpans", "baseSpans")


# -- the chain ---------------------------------------------------------------------------


@deepeval_tool("shout", metric_collection="shout-metrics")
def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


@langchain_tool("shout")
def shout_plain(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


def annotate(text: str) -> dict[str, str]:
    """A step that annotates the span deepeval opened for it (read from the ContextVar)."""
    update_current_span(metadata={"annotated": True})
    return {"text": text}


def make_chain(method: str, replies: int = 1) -> Runnable[Any, Any]:
    """prompt | chat model (usage, model name) | parser | annotate | tool: six spans."""
    message = AIMessage(
        content=REPLY,
        usage_metadata=USAGE,  # type: ignore[arg-type]
        response_metadata={"model_name": "fake-model-1", "model_provider": "fake"},
    )
    model = MetadataChatModel(messages=iter([message] * replies)).with_config(
        metadata={"ls_model_name": "fake-model-1", "ls_provider": "fake"}
    )
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "say {topic}")])
    # deepeval's @tool reads the current span in the tool body. On astream LangChain runs
    # this sync handler's hooks in executor copies of the context, so bare deepeval
    # 4.3.1 finds no span there and the tool raises: a bare failure, nothing to compare.
    final = shout_plain if method == "astream" else shout
    return prompt | model | StrOutputParser() | RunnableLambda(annotate, name="annotate") | final


def new_handler() -> CallbackHandler:
    return CallbackHandler(**TRACE_FIELDS)


# -- the scenarios -----------------------------------------------------------------------


def describe(value: Any) -> str | None:
    """A trace or span in a ContextVar, by kind and name (ids differ between runs)."""
    if value is None:
        return None
    return f"{type(value).__name__}:{getattr(value, 'name', None)}"


def caller_context() -> dict[str, str | None]:
    """What deepeval's ContextVars hold in the caller's context right now."""
    return {
        "trace": describe(current_trace_context.get()),
        "span": describe(current_span_context.get()),
    }


def call(method: str, chain: Runnable[Any, Any], config: RunnableConfig) -> dict[str, Any]:
    """One sync call (``invoke`` or ``stream``, consumed fully) and the context after it."""
    if method == "invoke":
        output = chain.invoke({"topic": "foxes"}, config=config)
    elif method == "stream":
        output = "".join(chain.stream({"topic": "foxes"}, config=config))
    else:
        raise ValueError(method)
    return {"output": output, "context_after": caller_context()}


async def acall(chain: Runnable[Any, Any], config: RunnableConfig) -> dict[str, Any]:
    chunks = [chunk async for chunk in chain.astream({"topic": "foxes"}, config=config)]
    return {"output": "".join(chunks), "context_after": caller_context()}


@observe(type="agent", name=OBSERVED_SPAN)
def observed(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The call inside deepeval's ``@observe``; after it, the caller annotates its span
    and trace through the ContextVars the handler handed back."""
    result = body()
    update_current_span(metadata={"after_chain": True})
    update_current_trace(tags=["after-chain"])
    return result


@observe(type="agent", name=OBSERVED_SPAN)
async def aobserved(body: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    result = await body()
    update_current_span(metadata={"after_chain": True})
    update_current_trace(tags=["after-chain"])
    return result


@contextmanager
def staged() -> Iterator[None]:
    """Span defaults staged around the call: the handler's start hooks pop them."""
    with (
        next_agent_span(metadata={"staged": "agent"}),
        next_llm_span(metadata={"staged": "llm"}, metric_collection="llm-metrics"),
    ):
        yield


def run_scenario(scenario: str, method: str, handler: Any, chain: Runnable[Any, Any]) -> Any:
    """Run ``chain`` with ``handler`` in one of the ways deepeval users wrap a call."""
    config: RunnableConfig = {"callbacks": [handler]}
    if method == "astream":
        if scenario == "observe":
            return asyncio.run(aobserved(lambda: acall(chain, config)))
        if scenario == "staged":

            async def staged_call() -> dict[str, Any]:
                with staged():
                    return await acall(chain, config)

            return asyncio.run(staged_call())
        return asyncio.run(acall(chain, config))
    if scenario == "observe":
        return observed(lambda: call(method, chain, config))
    if scenario == "staged":
        with staged():
            return call(method, chain, config)
    return call(method, chain, config)


# -- what deepeval recorded --------------------------------------------------------------


def reset_recording() -> None:
    trace_testing_manager.test_dict = None


def read_recording() -> dict[str, Any]:
    """The last finished trace (as posted, as a tree) and what deepeval still holds open."""
    payload = trace_testing_manager.test_dict
    return {
        "finished_trace": None if payload is None else trace_tree(payload),
        "open_traces": len(trace_manager.active_traces),
        "open_spans": sorted(str(span.name) for span in trace_manager.active_spans.values()),
    }


def trace_tree(payload: dict[str, Any]) -> dict[str, Any]:
    """The API body with its per-type span lists folded into one tree (parent links as
    nesting). Siblings sort by span uuid: LangChain's run ids, uuid7, in start order. The
    lists' own order (the SDK's walk of its span tree) is kept as ``serialized_order``."""
    body = dict(payload)
    spans: list[dict[str, Any]] = []
    order: dict[str, list[str]] = {}
    for key in SPAN_LISTS:
        items = body.pop(key, None) or []
        order[key] = [item["name"] for item in items]
        spans.extend(items)
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        children[span.get("parentUuid")].append(span)

    def node(span: dict[str, Any]) -> dict[str, Any]:
        out = dict(span)
        if isinstance(out.get("tokenIntervals"), dict):
            # Keyed by arrival time, re-derived per key from the wall clock (so they jitter
            # and may even sort out of order): the tokens in insertion order are the data.
            out["tokenIntervals"] = list(out["tokenIntervals"].values())
        kids = sorted(children.get(span["uuid"], []), key=lambda s: s["uuid"])
        out["children"] = [node(kid) for kid in kids]
        return out

    ids = {span["uuid"] for span in spans}
    roots = sorted((s for s in spans if s.get("parentUuid") not in ids), key=lambda s: s["uuid"])
    body["spans"] = [node(root) for root in roots]
    body["serialized_order"] = order
    return body


def walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from walk(node["children"])


def span_names(tree: dict[str, Any]) -> list[str]:
    return [node["name"] for node in walk(tree["spans"])]


def span_named(tree: dict[str, Any], name: str) -> dict[str, Any]:
    return next(node for node in walk(tree["spans"]) if node["name"] == name)
