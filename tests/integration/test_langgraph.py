"""LangGraph with hardened handlers behaves, and records, exactly as with bare ones.

- A ``GraphCallbackHandler`` subclass hardened is still one (LangGraph picks its lifecycle
  handlers by ``isinstance``) and gets the same interrupt/resume payloads and chain events.
- ``harden_config`` inside a node with an idle timeout leaves LangGraph's private
  idle-progress handler alone, and the timeout fires (or not) as it does bare.
- ``stream_mode="messages"`` with ``safecallbacks.install()`` active streams the same chunks;
  LangGraph's stream handler is never wrapped.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast
from uuid import UUID

import pytest

from tests._imports import import_or_skip

import_or_skip("langgraph")
lg_callbacks = import_or_skip("langgraph.callbacks")
if not hasattr(lg_callbacks, "GraphCallbackHandler"):
    pytest.skip("GraphCallbackHandler needs a newer langgraph", allow_module_level=True)

from langchain_core.callbacks import (  # noqa: E402
    BaseCallbackHandler,
    BaseCallbackManager,
)
from langchain_core.messages import AIMessage, BaseMessage  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402
from langgraph.callbacks import GraphCallbackHandler  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import Command, interrupt  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

import safecallbacks  # noqa: E402
from tests.integration._compare import assert_same, plain  # noqa: E402
from tests.integration._models import MetadataChatModel  # noqa: E402

try:
    from langgraph.errors import NodeTimeoutError
    from langgraph.pregel._retry import _IdleProgressCallbackHandler
    from langgraph.types import TimeoutPolicy
except ImportError:  # older langgraph: no node timeouts
    TimeoutPolicy = None  # type: ignore[assignment,misc]
    _IdleProgressCallbackHandler = None  # type: ignore[assignment,misc]
    NodeTimeoutError = None  # type: ignore[assignment,misc]

try:
    from langgraph.pregel._messages import StreamMessagesHandler
except ImportError:  # pragma: no cover - private module moved
    StreamMessagesHandler = None  # type: ignore[assignment,misc]

PLUMBING: list[type] = [
    cls for cls in (_IdleProgressCallbackHandler, StreamMessagesHandler) if cls is not None
]

# --------------------------------------------------------------------------- helpers


ELAPSED_RE = re.compile(r"elapsed: \d+(\.\d+)?s")


def without_elapsed(value: Any) -> Any:
    """Durations inside error messages (``elapsed: 0.253s``) are timing noise, not data."""
    if isinstance(value, dict):
        return {k: without_elapsed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_elapsed(v) for v in value]
    if isinstance(value, str):
        return ELAPSED_RE.sub("elapsed: <duration>", value)
    return value


def plumbing_seen(config: RunnableConfig) -> list[tuple[str, bool]]:
    """For each framework handler in ``config``: its class name and whether it is exactly it."""
    callbacks = config.get("callbacks")
    handlers: list[Any] = (
        callbacks.handlers if isinstance(callbacks, BaseCallbackManager) else list(callbacks or [])
    )
    return [
        (cls.__name__, type(h) is cls) for h in handlers for cls in PLUMBING if isinstance(h, cls)
    ]


class GraphRecorder(GraphCallbackHandler):
    """Records lifecycle payloads and chain/model events as LangGraph delivers them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.names: dict[UUID, tuple[str, UUID | None]] = {}

    def _add(self, **event: Any) -> None:
        with self._lock:
            self.events.append(event)

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        with self._lock:
            self.names[run_id] = (str(kwargs.get("name")), parent_run_id)
        self._add(hook="chain_start", run=run_id, inputs=plain(inputs), tags=tags)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._add(hook="chain_end", run=run_id, outputs=plain(outputs))

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._add(hook="chain_error", run=run_id, error=without_elapsed(plain(error)))

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        with self._lock:
            self.names[run_id] = (str(kwargs.get("name")), parent_run_id)
        self._add(hook="chat_model_start", run=run_id, messages=plain(messages))

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self._add(hook="token", run=kwargs["run_id"], token=token)

    def on_interrupt(self, event: Any) -> None:
        self._add(
            hook="interrupt",
            run=event.run_id,
            status=event.status,
            checkpoint_id=event.checkpoint_id,
            checkpoint_ns=list(event.checkpoint_ns),
            interrupts=[(plain(i.value), i.id) for i in event.interrupts],
        )

    def on_resume(self, event: Any) -> None:
        self._add(
            hook="resume",
            run=event.run_id,
            status=event.status,
            checkpoint_id=event.checkpoint_id,
            checkpoint_ns=list(event.checkpoint_ns),
        )

    def report(self, interrupt_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Events with ids made structural.

        Run ids become run-name paths (``LangGraph/ask``), checkpoint ids become their
        order of first appearance, interrupt ids their index among those the graph
        returned to the caller.
        """
        known = interrupt_ids or []
        checkpoints: dict[str, str] = {}

        def path(run_id: UUID | None) -> str | None:
            parts: list[str] = []
            while run_id is not None:
                if run_id not in self.names:
                    parts.append("<unknown run>")
                    break
                name, run_id = self.names[run_id]
                parts.append(name)
            return "/".join(reversed(parts)) if parts else None

        out: list[dict[str, Any]] = []
        for event in self.events:
            row = dict(event)
            row["run"] = path(event["run"])
            if "checkpoint_id" in row:
                cid = row["checkpoint_id"]
                row["checkpoint_id"] = checkpoints.setdefault(cid, f"checkpoint#{len(checkpoints)}")
            if "interrupts" in row:
                row["interrupts"] = [
                    (value, known.index(iid) if iid in known else "<not returned>")
                    for value, iid in row["interrupts"]
                ]
            out.append(row)
        return out


def delivered(handler: Any, hardened: bool) -> None:
    """Wait (bounded) until a hardened handler has every event emitted so far."""
    if hardened:
        assert safecallbacks.flush(handler, timeout=5.0), safecallbacks.stats(handler)


async def adelivered(handler: Any, hardened: bool) -> None:
    if hardened:
        assert await safecallbacks.aflush(handler, timeout=5.0), safecallbacks.stats(handler)


# ------------------------------------------------------------ interrupt and resume


class AskState(TypedDict, total=False):
    question: str
    answer: str


def approval_graph() -> Any:
    def ask(state: AskState) -> AskState:
        reply = interrupt({"question": state["question"], "options": ["yes", "no"]})
        return {"answer": f"got {reply}"}

    def finish(state: AskState) -> AskState:
        return {"answer": state["answer"] + "!"}

    builder = StateGraph(AskState)
    builder.add_node("ask", ask)
    builder.add_node("finish", finish)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", "finish")
    builder.add_edge("finish", END)
    return builder.compile(checkpointer=InMemorySaver())


def _interrupt_ids(outputs: list[Any]) -> list[str]:
    ids: list[str] = []
    for output in outputs:
        if isinstance(output, Mapping):
            ids.extend(i.id for i in output.get("__interrupt__", ()))
    return ids


def interrupt_then_resume(handler: Any, how: str, hardened: bool) -> dict[str, Any]:
    graph = approval_graph()
    config: RunnableConfig = {"configurable": {"thread_id": "t-1"}, "callbacks": [handler]}
    outputs: list[Any] = []
    inputs: list[Any] = [{"question": "ship it?"}, Command(resume="yes")]
    for graph_input in inputs:
        if how == "invoke":
            outputs.append(graph.invoke(graph_input, config))
        else:
            outputs.extend(graph.stream(graph_input, config, stream_mode="updates"))
    delivered(handler, hardened)
    ids = _interrupt_ids(outputs)
    return {"outputs": plain(outputs), "events": handler.report(ids)}


async def ainterrupt_then_resume(handler: Any, how: str, hardened: bool) -> dict[str, Any]:
    graph = approval_graph()
    config: RunnableConfig = {"configurable": {"thread_id": "t-1"}, "callbacks": [handler]}
    outputs: list[Any] = []
    inputs: list[Any] = [{"question": "ship it?"}, Command(resume="yes")]
    for graph_input in inputs:
        if how == "ainvoke":
            outputs.append(await graph.ainvoke(graph_input, config))
        else:
            outputs.extend(
                [chunk async for chunk in graph.astream(graph_input, config, stream_mode="updates")]
            )
    await adelivered(handler, hardened)
    ids = _interrupt_ids(outputs)
    return {"outputs": plain(outputs), "events": handler.report(ids)}


def _check_lifecycle(bare: dict[str, Any]) -> None:
    hooks = [event["hook"] for event in bare["events"]]
    assert "interrupt" in hooks and "resume" in hooks, hooks
    interrupt_event = next(e for e in bare["events"] if e["hook"] == "interrupt")
    assert interrupt_event["interrupts"][0][1] == 0, "interrupt id not the one returned"
    assert interrupt_event["run"] == "LangGraph"


def test_hardened_graph_handler_is_still_a_graph_handler(
    hardened: Callable[[Any], Any],
) -> None:
    handler = hardened(GraphRecorder())
    assert isinstance(handler, GraphCallbackHandler)
    assert isinstance(handler, GraphRecorder)
    manager = lg_callbacks.get_sync_graph_callback_manager_for_config({"callbacks": [handler]})
    assert manager.handlers == [handler], "LangGraph filtered the hardened handler out"


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_interrupt_and_resume_events_sync(hardened: Callable[[Any], Any], how: str) -> None:
    bare = interrupt_then_resume(GraphRecorder(), how, hardened=False)
    _check_lifecycle(bare)
    safe = interrupt_then_resume(hardened(GraphRecorder()), how, hardened=True)
    assert_same(bare, safe)


@pytest.mark.parametrize("how", ["ainvoke", "astream"])
async def test_interrupt_and_resume_events_async(hardened: Callable[[Any], Any], how: str) -> None:
    bare = await ainterrupt_then_resume(GraphRecorder(), how, hardened=False)
    _check_lifecycle(bare)
    safe = await ainterrupt_then_resume(hardened(GraphRecorder()), how, hardened=True)
    assert_same(bare, safe)


# ------------------------------------------------------------- state of the nodes


class TextState(TypedDict, total=False):
    topic: str
    text: str


# ------------------------------------------------------------------- idle timeout

needs_timeouts = pytest.mark.skipif(
    TimeoutPolicy is None, reason="node timeouts (TimeoutPolicy) need a newer langgraph"
)

IDLE_TIMEOUT = 0.25
TOKEN_DELAY = 0.02  # 41 chunks * 20 ms = ~0.8 s in all, far longer than the idle timeout


def idle_graph(use_harden_config: bool, stall: bool, seen: list[Any]) -> Any:
    words = " ".join(f"w{i}" for i in range(21))

    async def write(state: TextState, config: RunnableConfig) -> TextState:
        if use_harden_config:
            config = cast(RunnableConfig, safecallbacks.harden_config(config))
        seen.append(plumbing_seen(config))
        if stall:  # no callback event, no write: nothing refreshes the idle clock
            await asyncio.sleep(IDLE_TIMEOUT * 3)
        model = MetadataChatModel(messages=iter([AIMessage(content=words)]), delay=TOKEN_DELAY)
        text = ""
        async for chunk in model.astream(f"write about {state['topic']}", config):
            text += str(chunk.content)
        return {"text": text}

    builder = StateGraph(TextState)
    builder.add_node("write", write, timeout=TimeoutPolicy(idle_timeout=IDLE_TIMEOUT))
    builder.add_edge(START, "write")
    builder.add_edge("write", END)
    return builder.compile()


async def run_idle(handler: Any, use_harden_config: bool, stall: bool, how: str) -> dict[str, Any]:
    seen: list[Any] = []
    graph = idle_graph(use_harden_config, stall, seen)
    config: RunnableConfig = {"callbacks": [handler]}
    outcome: Any
    try:
        if how == "ainvoke":
            outcome = await graph.ainvoke({"topic": "tides"}, config)
        else:
            outcome = [chunk async for chunk in graph.astream({"topic": "tides"}, config)]
    except NodeTimeoutError as error:
        outcome = {"timed_out": type(error).__name__, "kind": getattr(error, "kind", None)}
    await adelivered(handler, use_harden_config)
    return {"outcome": plain(outcome), "plumbing": seen, "events": handler.report()}


@needs_timeouts
@pytest.mark.parametrize("how", ["ainvoke", "astream"])
@pytest.mark.parametrize("stall", [False, True], ids=["progressing", "stalled"])
async def test_idle_timeout_with_harden_config_in_the_node(how: str, stall: bool) -> None:
    bare = await run_idle(GraphRecorder(), use_harden_config=False, stall=stall, how=how)
    assert bare["plumbing"] == [[("_IdleProgressCallbackHandler", True)]]
    if stall:
        assert bare["outcome"]["timed_out"] == "NodeTimeoutError", bare["outcome"]
    else:
        assert "timed_out" not in str(bare["outcome"]), bare["outcome"]

    handler = GraphRecorder()
    try:
        safe = await run_idle(handler, use_harden_config=True, stall=stall, how=how)
        # harden_config hardened the user's handler in place and left LangGraph's alone.
        assert isinstance(handler, GraphCallbackHandler)
        assert safecallbacks.stats(handler).mode == "offload"
        assert_same(bare, safe)
    finally:
        await safecallbacks.aclose(handler, timeout=5.0)


# ----------------------------------------------------------- stream_mode="messages"


def messages_graph(seen: list[Any], asynchronous: bool) -> Any:
    """Two nodes, each streaming-capable model call; sync nodes or async nodes."""
    replies = {"first": "one two three four", "second": "five six seven"}

    def model_for(node: str) -> MetadataChatModel:
        return MetadataChatModel(messages=iter([AIMessage(content=replies[node])]))

    def sync_node(node: str) -> Callable[[TextState, RunnableConfig], TextState]:
        def run(state: TextState, config: RunnableConfig) -> TextState:
            seen.append(plumbing_seen(config))
            message = model_for(node).invoke(f"{node}: {state.get('text', '')}", config)
            return {"text": (state.get("text", "") + " " + str(message.content)).strip()}

        return run

    def async_node(node: str) -> Callable[[TextState, RunnableConfig], Any]:
        async def run(state: TextState, config: RunnableConfig) -> TextState:
            seen.append(plumbing_seen(config))
            message = await model_for(node).ainvoke(f"{node}: {state.get('text', '')}", config)
            return {"text": (state.get("text", "") + " " + str(message.content)).strip()}

        return run

    make: Callable[[str], Any] = async_node if asynchronous else sync_node
    builder = StateGraph(TextState)
    builder.add_node("first", make("first"))
    builder.add_node("second", make("second"))
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile()


def _messages_report(chunks: list[Any], seen: list[Any], handler: GraphRecorder) -> dict[str, Any]:
    return {"chunks": plain(chunks), "plumbing": seen, "events": handler.report()}


def test_stream_messages_unchanged_by_install() -> None:
    def run(handler: GraphRecorder) -> tuple[list[Any], list[Any]]:
        seen: list[Any] = []
        chunks = list(
            messages_graph(seen, asynchronous=False).stream(
                {"topic": "tides"}, {"callbacks": [handler]}, stream_mode="messages"
            )
        )
        return chunks, seen

    bare_handler = GraphRecorder()
    bare = _messages_report(*run(bare_handler), bare_handler)
    assert bare["plumbing"] == [[("StreamMessagesHandler", True)]] * 2
    assert len(bare["chunks"]) > 6, bare["chunks"]

    handler = GraphRecorder()
    safecallbacks.install()
    try:
        chunks, seen = run(handler)
        # uninstall() gives the handler its class back: wait for its events before that.
        assert safecallbacks.stats(handler).mode == "offload"
        delivered(handler, hardened=True)
    finally:
        safecallbacks.uninstall()
    assert_same(bare, _messages_report(chunks, seen, handler))


async def test_astream_messages_unchanged_by_install() -> None:
    async def run(handler: GraphRecorder) -> tuple[list[Any], list[Any]]:
        seen: list[Any] = []
        chunks = [
            chunk
            async for chunk in messages_graph(seen, asynchronous=True).astream(
                {"topic": "tides"}, {"callbacks": [handler]}, stream_mode="messages"
            )
        ]
        return chunks, seen

    bare_handler = GraphRecorder()
    bare = _messages_report(*await run(bare_handler), bare_handler)
    assert bare["plumbing"] == [[("StreamMessagesHandler", True)]] * 2
    assert len(bare["chunks"]) > 6, bare["chunks"]

    handler = GraphRecorder()
    safecallbacks.install()
    try:
        chunks, seen = await run(handler)
        assert safecallbacks.stats(handler).mode == "offload"
        await adelivered(handler, hardened=True)
    finally:
        safecallbacks.uninstall()
    assert_same(bare, _messages_report(chunks, seen, handler))


def test_plain_handler_is_not_mistaken_for_plumbing() -> None:
    """Sanity check of ``plumbing_seen``: a user handler is not reported as framework."""
    assert plumbing_seen({"callbacks": [BaseCallbackHandler()]}) == []
