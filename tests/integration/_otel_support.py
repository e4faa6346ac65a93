"""Real OpenTelemetry instrumentors of LangChain, recorded into comparable span trees.

Two instrumentors inject their own tracer into every LangChain callback manager by
wrapping ``BaseCallbackManager.__init__`` (wrapt) and skip the injection when a handler
``isinstance`` of their tracer's class is already there:

- OpenInference: ``LangChainInstrumentor`` -> ``OpenInferenceTracer`` (a ``BaseTracer``);
- Traceloop: ``LangchainInstrumentor`` -> ``TraceloopCallbackHandler``.

Spans go through a real SDK ``TracerProvider`` into an ``InMemorySpanExporter`` (optionally
wrapped by an exporter that raises or blocks, as a broken or hung collector would), and
are turned into nested trees (name, kind, status, attributes, events, children) that
``_compare.assert_same`` can compare field by field: ids and timestamps are the only things
left out; parent links are structural (a child sits under its parent).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

REPLY = "the quick brown fox jumps over the lazy dog"
QUESTION = "why"

# ---------------------------------------------------------------- instrumentors


@dataclass(frozen=True)
class InstrumentorSpec:
    """Where an instrumentor and its tracer class live, and how to find its tracer."""

    key: str
    module: str
    instrumentor: str
    tracer_module: str
    tracer_class: str

    def load(self) -> tuple[Any, type[BaseCallbackHandler]]:
        """The instrumentor class and the tracer class (ImportError when not installed)."""
        module = importlib.import_module(self.module)
        tracer_module = importlib.import_module(self.tracer_module)
        return getattr(module, self.instrumentor), getattr(tracer_module, self.tracer_class)


SPECS = {
    "openinference": InstrumentorSpec(
        key="openinference",
        module="openinference.instrumentation.langchain",
        instrumentor="LangChainInstrumentor",
        tracer_module="openinference.instrumentation.langchain._tracer",
        tracer_class="OpenInferenceTracer",
    ),
    "traceloop": InstrumentorSpec(
        key="traceloop",
        module="opentelemetry.instrumentation.langchain",
        instrumentor="LangchainInstrumentor",
        tracer_module="opentelemetry.instrumentation.langchain.callback_handler",
        tracer_class="TraceloopCallbackHandler",
    ),
}


def _traceloop_injected(init: Any, tracer_class: type) -> Any:
    """Traceloop keeps its handler only in the wrapt wrapper around ``__init__``."""
    seen = 0
    while init is not None and seen < 20:
        wrapper = getattr(init, "_self_wrapper", None)
        handler = getattr(wrapper, "_callback_handler", None)
        if isinstance(handler, tracer_class):
            return handler
        init = getattr(init, "__wrapped__", None)
        seen += 1
    return None


# What the instrumentors patch with wrapt: (module, owner class or None for the module, attrs).
# Traceloop 0.62.4's ``_uninstrument`` passes "module", "Class.method" to ``unwrap``, which
# then looks up an attribute literally named "Class.method" and restores nothing: after
# ``uninstrument()`` its ``BaseCallbackManager.__init__`` wrapper (holding the old handler
# and provider) stays, and the next ``instrument()`` stacks a second one that sees the old
# handler by ``isinstance`` and skips. So fixtures put these attributes back themselves.
_PATCHED: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("langchain_core.callbacks", "BaseCallbackManager", ("__init__",)),
    ("langgraph.pregel", "Pregel", ("stream", "astream")),
    ("langgraph.types", "Command", ("__init__",)),
    ("langgraph.prebuilt.chat_agent_executor", None, ("create_react_agent",)),
    ("langgraph.prebuilt", None, ("create_react_agent",)),
    (
        "langchain.agents.middleware.types",
        "AgentMiddleware",
        tuple(
            f"{prefix}{hook}"
            for prefix in ("", "a")
            for hook in ("before_model", "after_model", "before_agent", "after_agent")
        ),
    ),
    ("langchain.agents.factory", None, ("create_agent",)),
    ("langchain.agents", None, ("create_agent",)),
    (
        "langchain_community.llms.openai",
        "BaseOpenAI",
        ("_generate", "_agenerate", "_stream", "_astream"),
    ),
    (
        "langchain_openai.llms.base",
        "BaseOpenAI",
        ("_generate", "_agenerate", "_stream", "_astream"),
    ),
    ("langchain_openai.chat_models.base", "BaseChatOpenAI", ("_generate", "_agenerate")),
)
_MISSING = object()


class PatchSnapshot:
    """The attributes instrumentors patch, as they are now; ``restore()`` puts them back."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        for module_name, owner_name, attrs in _PATCHED:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # not installed, or does not import with this langchain-core
                continue
            owner = getattr(module, owner_name, None) if owner_name else module
            if owner is None:
                continue
            for attr in attrs:
                self._saved.append((owner, attr, vars(owner).get(attr, _MISSING)))

    def restore(self) -> None:
        for owner, attr, value in self._saved:
            if vars(owner).get(attr, _MISSING) is value:
                continue
            if value is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


@dataclass
class Otel:
    """One instrumentor on one SDK provider; ``exporter`` holds every finished span."""

    spec: InstrumentorSpec
    instrumentor: Any
    tracer_class: type[BaseCallbackHandler]
    provider: TracerProvider
    exporter: InMemorySpanExporter
    pristine: PatchSnapshot
    instrumented: bool = False

    def instrument(self) -> None:
        self.instrumentor.instrument(tracer_provider=self.provider)
        self.instrumented = True

    def uninstrument(self) -> None:
        """``uninstrument()``, then every patched attribute as it was before any instrument."""
        if self.instrumented:
            self.instrumentor.uninstrument()
            self.instrumented = False
            self.pristine.restore()

    def injected_tracer(self) -> Any:
        """The tracer object the instrumentor injects into callback managers."""
        if self.spec.key == "openinference":
            return self.instrumentor._tracer
        from langchain_core.callbacks import BaseCallbackManager

        return _traceloop_injected(BaseCallbackManager.__dict__["__init__"], self.tracer_class)

    def finished(self, flush: bool = True) -> list[ReadableSpan]:
        if flush:
            assert self.provider.force_flush(5_000), "span processors did not flush in 5 s"
        return list(self.exporter.get_finished_spans())


# ---------------------------------------------------------------- exporters


class RaisingExporter(SpanExporter):
    """Hands spans to a real in-memory exporter, then raises, like a broken collector."""

    def __init__(self, inner: InMemorySpanExporter, error: Callable[[], BaseException]) -> None:
        self.inner = inner
        self.error = error
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.inner.export(spans)
        raise self.error()

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class BlockingExporter(SpanExporter):
    """Hands spans to a real in-memory exporter after blocking up to ``block`` seconds.

    ``started`` is set when the first export begins; ``release()`` ends every block at
    once (fixtures call it so teardown never waits); ``first_returned`` is set when the
    first blocked export has returned.
    """

    def __init__(self, inner: InMemorySpanExporter, block: float = 2.0) -> None:
        self.inner = inner
        self.block = block
        self.started = threading.Event()
        self.first_returned = threading.Event()
        self._release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        first = not self.started.is_set()
        self.started.set()
        self._release.wait(self.block)
        result = self.inner.export(spans)
        if first:
            self.first_returned.set()
        return result

    def release(self) -> None:
        self._release.set()

    def shutdown(self) -> None:
        self.release()
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def make_provider(
    kind: str, inner: InMemorySpanExporter
) -> tuple[TracerProvider, SpanExporter | None]:
    """A provider whose processor feeds ``inner``: directly or through a broken exporter.

    ``kind``: "plain" (Simple processor), "raises" / "raises-cancelled" (Simple processor,
    the export raises ``RuntimeError`` / ``asyncio.CancelledError`` on the caller's thread)
    or "blocks" (Batch processor as the SDK default would use, each export blocks 2 s; a
    short schedule delay so the blocked export overlaps the stream instead of following it).
    """
    provider = TracerProvider()
    outer: SpanExporter | None = None
    if kind == "plain":
        provider.add_span_processor(SimpleSpanProcessor(inner))
    elif kind == "raises":
        outer = RaisingExporter(inner, lambda: RuntimeError("collector unreachable"))
        provider.add_span_processor(SimpleSpanProcessor(outer))
    elif kind == "raises-cancelled":
        outer = RaisingExporter(inner, lambda: asyncio.CancelledError("export cancelled"))
        provider.add_span_processor(SimpleSpanProcessor(outer))
    elif kind == "blocks":
        outer = BlockingExporter(inner, block=2.0)
        provider.add_span_processor(BatchSpanProcessor(outer, schedule_delay_millis=10))
    else:  # pragma: no cover - a typo in a parametrization
        raise ValueError(kind)
    return provider, outer


# ---------------------------------------------------------------- span trees


def _attr(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def span_tree(spans: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    """Finished spans as nested trees, roots and siblings in start order.

    Each node: name, path (names root to node), kind, status, attributes (all of them),
    events (name and attributes), links count, scope, children. A span whose parent is not
    among ``spans`` is a root with ``parent: "<outside>"`` (``None`` for a true root), and
    every node says whether it shares its root's trace.
    """
    by_id = {span.context.span_id: span for span in spans if span.context is not None}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        key = parent if parent in by_id else None
        children.setdefault(key, []).append(span)

    def order(items: list[ReadableSpan]) -> list[ReadableSpan]:
        return sorted(items, key=lambda s: (s.start_time or 0, s.name))

    def node(span: ReadableSpan, path: tuple[str, ...], trace_id: int) -> dict[str, Any]:
        here = (*path, span.name)
        assert span.context is not None
        if span.parent is None:
            parent: str | None = None
        elif span.parent.span_id in by_id:
            parent = "/".join(path)
        else:
            parent = "<outside>"
        return {
            "name": span.name,
            "path": "/".join(here),
            "parent": parent,
            "kind": span.kind.name,
            "status": {"code": span.status.status_code.name, "message": span.status.description},
            "attributes": {k: _attr(v) for k, v in sorted((span.attributes or {}).items())},
            "events": [
                {
                    "name": e.name,
                    "attributes": {k: _attr(v) for k, v in (e.attributes or {}).items()},
                }
                for e in span.events
            ],
            "links": len(span.links),
            "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
            "same_trace_as_root": span.context.trace_id == trace_id,
            "children": [
                node(child, here, trace_id)
                for child in order(children.get(span.context.span_id, []))
            ],
        }

    roots = order(children.get(None, []))
    return [node(root, (), root.context.trace_id if root.context else 0) for root in roots]


def walk(tree: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in tree:
        yield item
        yield from walk(item["children"])


def span_named(spans: Sequence[ReadableSpan], suffix: str) -> ReadableSpan:
    """The one span whose name is ``suffix`` or ends with `` suffix`` (Traceloop's prefixes)."""
    found = [s for s in spans if s.name == suffix or s.name.endswith(f" {suffix}")]
    assert len(found) == 1, f"{len(found)} spans named {suffix!r}: {[s.name for s in spans]}"
    return found[0]


def duration(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


# ---------------------------------------------------------------- the chain


@tool
def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


@tool
def explode(text: str) -> str:
    """Always fails: a broken backend."""
    raise LookupError(f"backend broken for {text!r}")


@dataclass
class Probe:
    """What the chain saw from inside: the handlers of its run and the current span."""

    handlers: list[BaseCallbackHandler] = field(default_factory=list)
    current_span: list[str | None] = field(default_factory=list)
    current_span_getter: Callable[[], Any] | None = None
    gate_seconds: float = 0.0  # time user code spent in the gate step (not a stall)

    def tracers(self, tracer_class: type) -> list[Any]:
        return [h for h in self.handlers if isinstance(h, tracer_class)]


def _span_name(span: Any) -> str | None:
    if span is None or not span.get_span_context().is_valid:
        return None
    return str(getattr(span, "name", None))


def current_span_getter(spec: InstrumentorSpec) -> Callable[[], Any]:
    """How user code inside a run finds the span of its run, per instrumentor.

    OpenInference looks the span up in its tracer (``get_current_span()``, through the
    instrumentor's own tracer object); Traceloop attaches the span to the OTel context.
    """
    if spec.key == "openinference":
        from openinference.instrumentation.langchain import get_current_span

        return get_current_span
    return trace_api.get_current_span


def build_chain(
    probe: Probe,
    *,
    reply: str = REPLY,
    sleep: float = 0.0,
    gate: Callable[[], None] | None = None,
    fail: bool = False,
) -> Runnable[str, str]:
    """prepare -> @tool shout [-> @tool explode] -> to_vars [-> slow] [-> gate] -> prompt
    -> model -> parser.

    ``prepare`` records the handlers of its run's callback manager and the current span;
    ``slow`` really sleeps ``sleep`` seconds; ``gate`` runs user code before the model.
    A fresh model each call: ``GenericFakeChatModel`` consumes its ``messages`` iterator.
    """

    def prepare(question: str, config: RunnableConfig) -> dict[str, str]:
        manager = config.get("callbacks")
        probe.handlers.extend(getattr(manager, "handlers", None) or [])
        if probe.current_span_getter is not None:
            probe.current_span.append(_span_name(probe.current_span_getter()))
        return {"text": question}

    def to_vars(text: str) -> dict[str, str]:
        return {"question": text}

    def slow(variables: dict[str, str]) -> dict[str, str]:
        deadline = time.monotonic() + sleep
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(left)
        return variables

    def gate_step(variables: dict[str, str]) -> dict[str, str]:
        assert gate is not None
        started = time.perf_counter()
        try:
            gate()
        finally:
            probe.gate_seconds += time.perf_counter() - started
        return variables

    steps: list[Runnable[Any, Any]] = [
        RunnableLambda(prepare),
        shout,
        *([RunnableLambda(lambda text: {"text": text}, name="to_text"), explode] if fail else []),
        RunnableLambda(to_vars),
    ]
    if sleep:
        steps.append(RunnableLambda(slow))
    if gate is not None:
        steps.append(RunnableLambda(gate_step))
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    model = GenericFakeChatModel(messages=iter([AIMessage(content=reply)]))
    chain: Runnable[Any, Any] = steps[0]
    for step in [*steps[1:], prompt, model, StrOutputParser()]:
        chain = chain | step
    return chain


@dataclass
class Outcome:
    """What a run produced: chunks, and the gaps before each chunk and the end (seconds).

    ``gaps[0]`` is the time from the call to the first chunk, then chunk to chunk, then
    last chunk to the end of the stream.
    """

    chunks: list[Any]
    gaps: list[float]
    error: BaseException | None = None

    def longest_gap(self, excluded: float = 0.0) -> float:
        """The longest gap; ``excluded`` (user code's own waiting) is taken off the first."""
        if not self.gaps:
            return 0.0
        return max(self.gaps[0] - excluded, *self.gaps[1:])


def run_chain(
    chain: Runnable[str, str], method: str, config: RunnableConfig | None = None
) -> Outcome:
    """Run ``chain`` by ``invoke``, ``stream`` or ``astream`` (in a fresh event loop).

    Gaps are measured from the call on (to the first chunk, each next chunk and the end
    of the stream). Each run gets a copy of the caller's context: a span an instrumentor
    leaves attached must not become the parent of the next run's spans.
    """
    return contextvars.copy_context().run(_run_chain, chain, method, config)


def _run_chain(chain: Runnable[str, str], method: str, config: RunnableConfig | None) -> Outcome:
    stamps: list[float] = [time.perf_counter()]
    chunks: list[Any] = []
    error: BaseException | None = None
    try:
        if method == "invoke":
            chunks.append(chain.invoke(QUESTION, config=config))
            stamps.append(time.perf_counter())
        elif method == "stream":
            for chunk in chain.stream(QUESTION, config=config):
                stamps.append(time.perf_counter())
                chunks.append(chunk)
        elif method == "astream":

            async def consume() -> None:
                async for chunk in chain.astream(QUESTION, config=config):
                    stamps.append(time.perf_counter())
                    chunks.append(chunk)

            asyncio.run(consume())
        else:  # pragma: no cover - a typo in a parametrization
            raise ValueError(method)
    except BaseException as exc:  # a stream a handler killed is an outcome, not a crash
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        error = exc
    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Outcome(chunks=chunks, gaps=gaps, error=error)


# ---------------------------------------------------------------- a plain handler


class RunRecorder(BaseCallbackHandler):
    """A user's own handler passed in the config: records (hook, name, parent name)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str | None]] = []
        self._names: dict[UUID, str | None] = {}

    def _note(
        self, hook: str, run_id: UUID, parent_run_id: UUID | None, name: str | None = None
    ) -> None:
        if name is not None or run_id not in self._names:
            self._names[run_id] = name
        parent = self._names.get(parent_run_id) if parent_run_id is not None else None
        self.events.append((hook, self._names.get(run_id), parent))

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        self._note("chain_start", kwargs["run_id"], kwargs.get("parent_run_id"), kwargs.get("name"))

    def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
        self._note("chain_end", kwargs["run_id"], kwargs.get("parent_run_id"))

    def on_tool_start(self, serialized: Any, input_str: str, **kwargs: Any) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name")
        self._note("tool_start", kwargs["run_id"], kwargs.get("parent_run_id"), name)

    def on_tool_end(self, output: Any, **kwargs: Any) -> None:
        self._note("tool_end", kwargs["run_id"], kwargs.get("parent_run_id"))

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name") or "chat_model"
        self._note("chat_model_start", kwargs["run_id"], kwargs.get("parent_run_id"), name)

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self._note(f"token:{token}", kwargs["run_id"], kwargs.get("parent_run_id"))

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._note("llm_end", kwargs["run_id"], kwargs.get("parent_run_id"))
