"""Langfuse's LangChain ``CallbackHandler`` records the same span trees hardened as bare.

Real langfuse (5.x, OpenTelemetry based) with its default background export (a
``BatchSpanProcessor`` shipping OTLP/HTTP protobuf) against a local fake Langfuse server
that decodes every span (``_langfuse_server``). Each client gets its own
``TracerProvider`` so tests neither share nor leak exporters. Recordings are compared
as span trees (parent links as nesting), field by field, ids and timestamps scrubbed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests._imports import import_or_skip

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
langfuse = import_or_skip("langfuse")
if not hasattr(langfuse, "propagate_attributes"):
    pytest.skip("needs the OpenTelemetry based langfuse (>= 3)", allow_module_level=True)
# langfuse.langchain refuses to import on langchain-core < 1 (ModuleNotFoundError).
langfuse_langchain = import_or_skip("langfuse.langchain")

from langchain_core.language_models.fake_chat_models import (  # noqa: E402
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import (  # noqa: E402
    Runnable,
    RunnableConfig,
    RunnableGenerator,
    RunnableLambda,
)
from langchain_core.tools import tool  # noqa: E402
from langfuse import Langfuse, propagate_attributes  # noqa: E402
from langfuse._client.resource_manager import LangfuseResourceManager  # noqa: E402
from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace as otel_trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import safecallbacks  # noqa: E402
from safecallbacks import harden  # noqa: E402

from ._compare import assert_same  # noqa: E402
from ._langfuse_server import (  # noqa: E402
    FakeLangfuse,
    SpanRecord,
    serve_fake_langfuse,
    span_forest,
    walk,
)

CallbackHandler = langfuse_langchain.CallbackHandler

PUBLIC_KEY = "pk-test"
SECRET_KEY = "sk-test"
SESSION_ID = "session-42"
USER_ID = "user-7"
TRACE_TAGS = ["lf-tag-a", "lf-tag-b"]
REPLY = "the quick brown fox jumps over the lazy dog"
USAGE = {"input_tokens": 4, "output_tokens": 9, "total_tokens": 13}

# Tags of the trace are built from a set by the handler: their order is arbitrary.
UNORDERED_ATTRIBUTES = frozenset({"langfuse.trace.tags"})


# -- the chain ---------------------------------------------------------------------------


@tool
def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


def to_tool_input(text: str) -> dict[str, str]:
    return {"text": text}


def fake_model(replies: int = 1, content: str = REPLY) -> Runnable[Any, Any]:
    model = GenericFakeChatModel(
        messages=iter([AIMessage(content=content, usage_metadata=USAGE) for _ in range(replies)])
    )
    # GenericFakeChatModel has no model name of its own; Langfuse reads this key.
    return model.with_config(metadata={"ls_model_name": "fake-model-1"})


def make_chain(replies: int = 1) -> Runnable[Any, Any]:
    """prompt | chat model | parser | lambda | tool: six spans per call."""
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "say {topic}")])
    return (
        prompt
        | fake_model(replies)
        | StrOutputParser()
        | RunnableLambda(to_tool_input, name="to_tool_input")
        | shout
    )


CHAIN_SPANS = [
    "RunnableSequence",
    "ChatPromptTemplate",
    "GenericFakeChatModel",
    "StrOutputParser",
    "to_tool_input",
    "shout",
]


def run_chain(method: str, chain: Runnable[Any, Any], value: Any, config: RunnableConfig) -> Any:
    """Run ``chain`` through one of LangChain's entry points; return its (joined) output."""
    if method == "invoke":
        return chain.invoke(value, config=config)
    if method == "stream":
        return list(chain.stream(value, config=config))
    if method == "ainvoke":
        return asyncio.run(chain.ainvoke(value, config=config))
    if method == "astream":

        async def collect() -> list[Any]:
            return [chunk async for chunk in chain.astream(value, config=config)]

        return asyncio.run(collect())
    raise ValueError(method)


def trace_config(handler: Any, **extra: Any) -> RunnableConfig:
    config: RunnableConfig = {
        "callbacks": [handler],
        "tags": ["request-tag"],
        "metadata": {
            "langfuse_session_id": SESSION_ID,
            "langfuse_user_id": USER_ID,
            "langfuse_tags": list(TRACE_TAGS),
            "tenant": "acme",
        },
    }
    config.update(extra)  # type: ignore[typeddict-item]
    return config


# -- the rig -----------------------------------------------------------------------------


@dataclass
class Rig:
    """A real Langfuse client exporting to the fake server."""

    url: str
    server: FakeLangfuse
    client: Langfuse

    def record(
        self,
        handler: Any,
        run: Callable[[Any], Any],
        *,
        expected_spans: int | None = None,
    ) -> list[SpanRecord]:
        """Run ``run(handler)`` and return the spans it exported (flushed, bounded wait)."""
        self.server.take()
        run(handler)
        if is_hardened(handler):
            assert safecallbacks.flush(handler, timeout=5.0), "hardened handler did not flush"
        self.client.flush()

        def complete(spans: list[SpanRecord]) -> bool:
            if expected_spans is not None:
                return len(spans) >= expected_spans
            ids = {s["span_id"] for s in spans}
            return any(s["parent_span_id"] not in ids for s in spans)

        return self.server.wait_for(complete, timeout=5.0)


def is_hardened(handler: Any) -> bool:
    """Hardening swaps the handler's class for a generated subclass of its own."""
    return type(handler) is not CallbackHandler


def forest(spans: list[SpanRecord]) -> list[dict[str, Any]]:
    trees = span_forest(spans)
    for node in walk(trees):
        for key in UNORDERED_ATTRIBUTES & node["attributes"].keys():
            node["attributes"][key] = sorted(node["attributes"][key])
    return trees


def names(trees: list[dict[str, Any]]) -> list[str]:
    return [node["name"] for node in walk(trees)]


def _clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LANGFUSE_"):
            monkeypatch.delenv(name)
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "LANGSMITH_TRACING",
        "LANGSMITH_TRACING_V2",
        "LANGCHAIN_TRACING_V2",
        "LANGCHAIN_TRACING",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Rig]]:
    """A factory for one fake server plus a fresh Langfuse client (options passed on)."""
    _clear_environment(monkeypatch)
    threads_before = set(threading.enumerate())
    # Clients are per public key singletons: start from none, so CallbackHandler()'s
    # get_client() resolves to the one made here.
    LangfuseResourceManager.reset()
    providers: list[TracerProvider] = []
    clients: list[Langfuse] = []
    servers: list[FakeLangfuse] = []

    with serve_fake_langfuse() as (url, server):
        servers.append(server)

        def factory(**options: Any) -> Rig:
            assert not clients, "one client per test"
            provider = TracerProvider()
            providers.append(provider)
            client = Langfuse(
                public_key=PUBLIC_KEY,
                secret_key=SECRET_KEY,
                host=url,
                tracer_provider=provider,
                **options,
            )
            clients.append(client)
            return Rig(url=url, server=server, client=client)

        try:
            yield factory
        finally:
            server.set_mode("ok")
            for client in clients:
                client.shutdown()
                _stop_prompt_cache_thread(client)
            for provider in providers:
                provider.shutdown()
            LangfuseResourceManager.reset()

    for server in servers:
        unexpected = [(r.method, r.path) for r in server.unexpected_requests()]
        assert not unexpected, f"requests the fake Langfuse does not know: {unexpected}"
        bad_auth = [r.path for r in server.requests if not server.auth_ok(r.authorization)]
        assert not bad_auth, f"requests without the client's Basic auth: {bad_auth}"
    leftover = wait_for_threads_gone(threads_before, timeout=5.0)
    assert not leftover, f"threads left running: {leftover}"


def _stop_prompt_cache_thread(client: Langfuse) -> None:
    """``Langfuse.shutdown()`` leaves the prompt cache's refresh thread running: stop it."""
    cache = getattr(client._resources, "prompt_cache", None)
    task_manager = getattr(cache, "_task_manager", None)
    if task_manager is not None:
        task_manager.shutdown()


def wait_for_threads_gone(before: set[threading.Thread], timeout: float) -> list[str]:
    """Names of Langfuse / OTel / server threads started during the test still alive."""

    def ours(thread: threading.Thread) -> bool:
        module = type(thread).__module__
        return module.startswith(
            ("langfuse", "opentelemetry", "uvicorn")
        ) or thread.name.startswith(("OtelBatch", "fake-langfuse"))

    deadline = time.monotonic() + timeout
    while True:
        alive = [t.name for t in threading.enumerate() if t not in before and ours(t)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


# -- 1. the same span tree ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["invoke", "stream", "astream"])
def test_same_span_tree_hardened_as_bare(rig: Rig, method: str) -> None:
    def run(handler: Any) -> None:
        output = run_chain(method, make_chain(), {"topic": "foxes"}, trace_config(handler))
        joined = output if isinstance(output, str) else "".join(output)
        assert joined == REPLY.upper()

    bare_spans = rig.record(CallbackHandler(), run)
    bare = forest(bare_spans)

    # The harness sees what Langfuse would: the chain's six spans in one trace, with the
    # trace attributes the handler propagated from the config metadata.
    assert names(bare) == CHAIN_SPANS
    assert len({s["trace_id"] for s in bare_spans}) == 1
    root = bare[0]["attributes"]
    assert root["session.id"] == SESSION_ID
    assert root["user.id"] == USER_ID
    assert root["langfuse.trace.tags"] == sorted([*TRACE_TAGS, "request-tag"])
    assert root["langfuse.trace.metadata.tenant"] == "acme"
    assert root["langfuse.observation.input"] == {"topic": "foxes"}
    assert root["langfuse.observation.output"] == REPLY.upper()
    generation = next(n for n in walk(bare) if n["name"] == "GenericFakeChatModel")["attributes"]
    assert generation["langfuse.observation.type"] == "generation"
    assert generation["langfuse.observation.model.name"] == "fake-model-1"
    assert generation["langfuse.observation.output"]["content"] == REPLY
    tool_span = next(n for n in walk(bare) if n["name"] == "shout")["attributes"]
    assert tool_span["langfuse.observation.type"] == "tool"
    if method != "astream":
        # (On astream langchain-core runs this non-inline sync handler in an executor
        # copy of the context, so bare Langfuse loses its propagation for child spans.)
        assert all(n["attributes"].get("session.id") == SESSION_ID for n in walk(bare))
    if method == "invoke":
        assert generation["langfuse.observation.usage_details"] == {
            "input": 4,
            "output": 9,
            "total": 13,
        }

    handler = CallbackHandler()
    assert harden(handler) is handler
    assert isinstance(handler, CallbackHandler)
    assert safecallbacks.stats(handler).mode == "inline"
    hardened = forest(rig.record(handler, run, expected_spans=len(bare_spans)))

    assert_same(bare, hardened)
    stats = safecallbacks.stats(handler)
    assert stats.failed == 0, stats


@pytest.mark.parametrize("method", ["ainvoke", "astream"])
def test_async_calls_leave_the_callers_context_alone(rig: Rig, method: str) -> None:
    """Three calls in a row in one task: three traces, and no span or propagated
    attribute of one call left attached to the caller's context for the next one."""
    topics = ["first", "second", "third"]

    def run(handler: Any) -> None:
        async def calls() -> None:
            for index, topic in enumerate(topics):
                config = trace_config(handler) if index != 1 else {"callbacks": [handler]}
                if method == "ainvoke":
                    await make_chain().ainvoke({"topic": topic}, config=config)
                else:
                    async for _ in make_chain().astream({"topic": topic}, config=config):
                        pass
                leaked = [str(key) for key in otel_context.get_current()]
                assert not leaked, f"caller's context after call {index}: {leaked}"
                assert not otel_trace.get_current_span().get_span_context().is_valid

        asyncio.run(calls())

    bare_spans = rig.record(CallbackHandler(), run)
    bare = forest(bare_spans)
    assert [tree["name"] for tree in bare] == ["RunnableSequence"] * len(topics)
    assert len({s["trace_id"] for s in bare_spans}) == len(topics)
    assert "session.id" not in bare[1]["attributes"]

    handler = harden(CallbackHandler())
    hardened_spans = rig.record(handler, run, expected_spans=len(bare_spans))
    assert len({s["trace_id"] for s in hardened_spans}) == len(topics)
    assert_same(bare, forest(hardened_spans))


# -- 2. last_trace_id right after the call -----------------------------------------------


@pytest.mark.parametrize("method", ["invoke", "ainvoke"])
@pytest.mark.parametrize("variant", ["bare", "hardened"])
def test_last_trace_id_is_this_calls_trace(rig: Rig, method: str, variant: str) -> None:
    calls = 4
    handler = CallbackHandler()
    if variant == "hardened":
        harden(handler)
    chain = make_chain(replies=calls)
    seen: list[str | None] = []

    def run(h: Any) -> None:
        for index in range(calls):
            run_chain(method, chain, {"topic": f"call-{index}"}, {"callbacks": [h]})
            seen.append(h.last_trace_id)  # read right after the call returned

    spans = rig.record(handler, run, expected_spans=calls * len(CHAIN_SPANS))

    trace_of_call: dict[str, str] = {}
    for span in spans:
        if span["parent_span_id"] is None:
            topic = json.loads(span["attributes"]["langfuse.observation.input"])["topic"]
            trace_of_call[topic] = span["trace_id"]
    expected = [trace_of_call.get(f"call-{i}") for i in range(calls)]
    assert None not in expected, sorted(trace_of_call)
    assert len(set(expected)) == calls
    assert seen == expected


# -- 3. propagate_attributes -------------------------------------------------------------


@pytest.mark.parametrize("method", ["invoke", "stream", "astream"])
@pytest.mark.parametrize("source", ["caller", "handler"])
def test_propagated_attributes_reach_child_spans(rig: Rig, method: str, source: str) -> None:
    """Around the call (``propagate_attributes``) or entered by the handler at chain start."""

    def run(handler: Any) -> None:
        if source == "caller":
            with propagate_attributes(
                user_id="prop-user",
                session_id="prop-session",
                tags=["prop-tag"],
                metadata={"region": "eu"},
                trace_name="prop-trace",
            ):
                run_chain(method, make_chain(), {"topic": "x"}, {"callbacks": [handler]})
        else:
            config = trace_config(handler)
            config["metadata"]["langfuse_trace_name"] = "prop-trace"
            run_chain(method, make_chain(), {"topic": "x"}, config)

    bare_spans = rig.record(CallbackHandler(), run)
    bare = forest(bare_spans)
    assert names(bare) == CHAIN_SPANS
    expected_user = "prop-user" if source == "caller" else USER_ID
    assert bare[0]["attributes"]["user.id"] == expected_user
    assert bare[0]["attributes"]["langfuse.trace.name"] == "prop-trace"
    if source == "caller" or method != "astream":
        for node in walk(bare):
            assert node["attributes"].get("user.id") == expected_user, node["name"]
            assert node["attributes"].get("langfuse.trace.name") == "prop-trace", node["name"]

    handler = harden(CallbackHandler())
    hardened = forest(rig.record(handler, run, expected_spans=len(bare_spans)))
    assert_same(bare, hardened)


# -- 4. span durations -------------------------------------------------------------------


NAP = 0.3


def nap(value: dict[str, str]) -> dict[str, str]:
    time.sleep(NAP)
    return value


@pytest.mark.parametrize("method", ["invoke", "astream"])
def test_span_durations_hardened_as_bare(rig: Rig, method: str) -> None:
    def run(handler: Any) -> None:
        chain = RunnableLambda(nap, name="nap") | make_chain()
        run_chain(method, chain, {"topic": "sleep"}, {"callbacks": [handler]})

    def durations(spans: list[SpanRecord]) -> dict[str, float]:
        return {s["name"]: (s["end_ns"] - s["start_ns"]) / 1e9 for s in spans}

    bare = durations(rig.record(CallbackHandler(), run))
    hardened = durations(rig.record(harden(CallbackHandler()), run, expected_spans=len(bare)))

    assert bare["nap"] >= NAP
    assert hardened.get("nap", 0.0) >= NAP, hardened
    assert hardened["RunnableSequence"] >= NAP, hardened
    # Same shape of timing, not just a lower bound: within 0.15 s of what bare saw.
    assert abs(hardened["nap"] - bare["nap"]) < 0.15, (bare, hardened)
    assert abs(hardened["RunnableSequence"] - bare["RunnableSequence"]) < 0.15, (bare, hardened)


# -- 5. a hung or failing Langfuse never stalls the stream -------------------------------


CHUNK_PAUSE = 0.02
MAX_GAP = 1.0


def paced(chunks: Iterator[str]) -> Iterator[str]:
    for chunk in chunks:
        time.sleep(CHUNK_PAUSE)
        yield chunk


async def apaced(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    async for chunk in chunks:
        await asyncio.sleep(CHUNK_PAUSE)
        yield chunk


def timed_stream(method: str, chain: Runnable[Any, Any], config: RunnableConfig) -> list[float]:
    """Chunk arrival times (monotonic), with the start and the end of the stream."""
    marks = [time.monotonic()]
    if method == "stream":
        for _ in chain.stream({"topic": "slow server"}, config=config):
            marks.append(time.monotonic())
    else:

        async def consume() -> None:
            async for _ in chain.astream({"topic": "slow server"}, config=config):
                marks.append(time.monotonic())

        asyncio.run(consume())
    marks.append(time.monotonic())
    return marks


@pytest.mark.parametrize("method", ["stream", "astream"])
@pytest.mark.parametrize("failure", ["hang", "error"])
def test_slow_or_failing_server_never_stalls_the_stream(
    make_rig: Callable[..., Rig], method: str, failure: str
) -> None:
    # The SDK's own background export, told to ship each ended span within 50 ms, so the
    # server misbehaves while the stream is still running.
    rig = make_rig(flush_at=1, flush_interval=0.05)
    rig.server.set_mode(failure, hang_seconds=3.0)
    words = " ".join(f"w{i}" for i in range(25))
    chain = (
        ChatPromptTemplate.from_messages([("human", "say {topic}")])
        | fake_model(content=words)
        | StrOutputParser()
        | RunnableGenerator(paced, apaced, name="paced")
    )
    handler = harden(CallbackHandler())
    assert safecallbacks.stats(handler).mode == "inline"

    marks = timed_stream(method, chain, {"callbacks": [handler]})

    chunks = len(marks) - 2
    assert chunks >= 25, chunks
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    assert max(gaps) < MAX_GAP, f"longest gap {max(gaps):.3f}s over {chunks} chunks"
    started, ended = marks[0], marks[-1]
    during = [r for r in rig.server.otlp_requests() if started <= r.started <= ended]
    assert during, "no export reached the misbehaving server while the stream ran"
    if failure == "hang":
        assert any(r.finished is None or r.finished > ended for r in during)
    else:
        assert any(r.status == 500 for r in during)
    assert safecallbacks.stats(handler).failed == 0
