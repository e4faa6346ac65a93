"""Streaming a LangChain chat model through FastAPI with hardened callback handlers.

Run it with ``python examples/fastapi_stream.py`` and try::

    curl -N 'http://127.0.0.1:8000/safe/stream?handler=raise'
    curl -N 'http://127.0.0.1:8000/bare/stream?handler=raise'     # dies at the first token
    curl -N 'http://127.0.0.1:8000/safe/sse?handler=stall'
    curl -N 'http://127.0.0.1:8000/bare/sse?handler=stall'        # freezes for 2 s mid-stream

Every request gets its own handler instance (``?handler=count|raise|stall``). Routes under
``/safe`` attach ``harden(handler)``; routes under ``/bare`` attach the handler as is, which is
how most applications do it today and is kept here to show what goes wrong.

The streaming part follows a few rules that matter in production:

* The response body is an async generator over ``model.astream(...)``, opened with
  ``contextlib.aclosing`` so the model's own generator is closed (and its ``on_llm_error`` /
  ``on_llm_end`` callbacks fire) whatever way the body ends.
* ``ClosingStreamingResponse`` closes the body generator as soon as the response is over,
  including when the client hangs up, instead of leaving it to the garbage collector.
* Hardened per-request handlers are flushed *after* the last byte went out, with a bounded
  timeout, so a slow handler never holds the response open.
* ``X-Accel-Buffering: no`` tells nginx not to buffer the stream.

With ``opentelemetry-sdk`` and ``opentelemetry-exporter-prometheus`` installed, the app also
serves the package's OpenTelemetry metrics at ``/metrics`` for Prometheus to scrape (see
``dashboards/safecallbacks.json``); without them it runs the same, with no ``/metrics``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import anyio
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig
from starlette.types import Receive, Scope, Send

from safecallbacks import Stats, harden

__all__ = [
    "HANDLER_KINDS",
    "ClosingStreamingResponse",
    "CountingHandler",
    "PacedFakeChatModel",
    "RaisingHandler",
    "StallingHandler",
    "StreamRecord",
    "create_app",
    "make_handler",
    "make_text",
    "prometheus_meter_provider",
]

Route = Literal["bare", "safe"]
Flavour = Literal["stream", "sse"]


# --------------------------------------------------------------------------------------------
# A fake model that streams at a realistic pace
# --------------------------------------------------------------------------------------------


class PacedFakeChatModel(GenericFakeChatModel):
    """``GenericFakeChatModel`` that waits ``delay`` seconds before each chunk.

    The chunking is the parent's (text split on whitespace, whitespace kept as its own
    chunk); only the pacing is added, so callbacks go through LangChain's normal streaming
    machinery exactly as with a real provider.
    """

    delay: float = 0.005

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in super()._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
            time.sleep(self.delay)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The parent's chunker is pure computation, so it is fine to drive it from the loop;
        # the async run manager (when LangChain hands us one) gets the token like the sync
        # path would give it to the sync manager.
        for chunk in super()._stream(messages, stop=stop, run_manager=None, **kwargs):
            await asyncio.sleep(self.delay)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def make_text(words: int) -> str:
    """The deterministic reply the fake model streams: ``w0 w1 ... w{n-1}``."""
    return " ".join(f"w{i}" for i in range(words))


# --------------------------------------------------------------------------------------------
# Handlers that misbehave the way real tracing/logging handlers do
# --------------------------------------------------------------------------------------------


class CountingHandler(BaseCallbackHandler):
    """Well-behaved handler: counts the tokens it is given."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], **kwargs: Any) -> None:
        self.tokens += 1


class RaisingHandler(BaseCallbackHandler):
    """Fails on every token and asks LangChain to re-raise (``raise_error = True``)."""

    raise_error = True

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], **kwargs: Any) -> None:
        raise RuntimeError("tracing backend rejected the event")


class StallingHandler(BaseCallbackHandler):
    """Blocks once, mid-stream, like a logging call stuck on a slow collector."""

    def __init__(self, stall_seconds: float = 2.0, at_token: int = 10) -> None:
        self.stall_seconds = stall_seconds
        self.at_token = at_token
        self.tokens = 0
        self.stalled = False

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], **kwargs: Any) -> None:
        self.tokens += 1
        if not self.stalled and self.tokens >= self.at_token:
            self.stalled = True
            time.sleep(self.stall_seconds)


HANDLER_KINDS: dict[str, Callable[[], BaseCallbackHandler]] = {
    "count": CountingHandler,
    "raise": RaisingHandler,
    "stall": StallingHandler,
}

HandlerFactory = Callable[[str], BaseCallbackHandler]


def make_handler(kind: str) -> BaseCallbackHandler:
    """Default handler factory: a fresh handler of the named kind."""
    try:
        return HANDLER_KINDS[kind]()
    except KeyError:
        raise ValueError(f"unknown handler kind {kind!r}") from None


# --------------------------------------------------------------------------------------------
# Streaming plumbing
# --------------------------------------------------------------------------------------------


@dataclass
class StreamRecord:
    """What happened to one streamed response (handed to ``on_record`` for tests/metrics).

    ``handler`` is the object attached to the run: the hardened wrapper on ``/safe``, the
    raw handler on ``/bare``. The events are ``threading.Event`` so that code outside the
    server's event loop (a test, a metrics thread) can wait on them.
    """

    stream_id: str
    route: Route
    flavour: Flavour
    kind: str
    handler: BaseCallbackHandler
    chunks_sent: int = 0
    completed: bool = False
    error: BaseException | None = None
    flushed: bool | None = None
    stats: Stats | None = None
    generator_closed: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body and then runs ``on_finish``.

    Starlette stops iterating the body when the client disconnects but does not close the
    generator; its ``finally`` blocks would run whenever the garbage collector gets to it.
    Here the generator is closed right away and ``on_finish`` runs afterwards, shielded
    from cancellation so that it also runs during shutdown.
    """

    def __init__(
        self,
        content: AsyncIterator[str],
        *,
        on_finish: Callable[[], Awaitable[None]] | None = None,
        media_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._body = content
        self._on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._body, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self._on_finish is not None:
                    await self._on_finish()


def _sse(event: str, data: Mapping[str, Any]) -> str:
    # JSON keeps whitespace-only and multi-line tokens intact inside one `data:` line.
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _body(
    model: PacedFakeChatModel,
    config: RunnableConfig,
    record: StreamRecord,
) -> AsyncIterator[str]:
    try:
        # astream() is an async generator; closing it explicitly lets LangChain finish the run
        # (on_llm_error on a disconnect) right now instead of at garbage collection.
        stream = cast("AsyncGenerator[AIMessageChunk, None]", model.astream("hi", config=config))
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                text = chunk.content if isinstance(chunk.content, str) else ""
                if not text:
                    continue
                record.chunks_sent += 1
                yield _sse("token", {"token": text}) if record.flavour == "sse" else text
        if record.flavour == "sse":
            yield _sse("end", {"chunks": record.chunks_sent})
        record.completed = True
    except BaseException as exc:
        record.error = exc
        raise
    finally:
        record.generator_closed.set()


# --------------------------------------------------------------------------------------------
# Metrics for Prometheus (optional)
# --------------------------------------------------------------------------------------------

# Histogram buckets in seconds, from 100 µs to 10 s. The OpenTelemetry SDK's default buckets
# (0, 5, 10, 25, ... 10000) suit milliseconds, and would put every delivery in the first one.
SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def prometheus_meter_provider() -> Any | None:
    """An OpenTelemetry SDK ``MeterProvider`` whose metrics ``/metrics`` serves.

    ``None`` when ``opentelemetry-sdk`` or ``opentelemetry-exporter-prometheus`` is not
    installed. Install it with ``opentelemetry.metrics.set_meter_provider(provider)``; the
    exporter's reader registers with ``prometheus_client``'s default registry, which is what
    the app's ``/metrics`` route serves.
    """
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    except ImportError:
        return None
    buckets = ExplicitBucketHistogramAggregation(boundaries=SECONDS_BUCKETS)
    return MeterProvider(
        metric_readers=[PrometheusMetricReader()],
        views=[
            View(instrument_name="safecallbacks.handler.duration", aggregation=buckets),
            View(instrument_name="safecallbacks.delivery.lag", aggregation=buckets),
        ],
    )


def _add_metrics_route(app: FastAPI) -> None:
    """``GET /metrics`` in Prometheus's text format, if ``prometheus_client`` is installed."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    except ImportError:
        return

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        # A plain (sync) route: FastAPI runs it in a thread, so collecting (which runs the
        # queue-depth gauge's callback) never blocks the event loop.
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def create_app(
    handler_factory: HandlerFactory = make_handler,
    *,
    flush_timeout: float = 5.0,
    on_record: Callable[[StreamRecord], None] | None = None,
    metrics_route: bool = True,
) -> FastAPI:
    """Build the demo app.

    ``handler_factory(kind)`` makes the per-request handler, ``kind`` being the ``handler``
    query parameter. ``on_record`` sees each stream's ``StreamRecord`` before the first byte
    goes out (tests use it to watch the server side of a stream). With ``metrics_route`` and
    ``prometheus_client`` installed, ``GET /metrics`` serves the metrics for Prometheus.
    """
    app = FastAPI(title="safecallbacks streaming example")
    ids = itertools.count(1)
    if metrics_route:
        _add_metrics_route(app)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/{route}/{flavour}")
    async def stream(
        route: Route,
        flavour: Flavour,
        handler: str = "count",
        words: int = Query(40, ge=1, le=20_000),
        delay_ms: float = Query(5.0, ge=0.0, le=1_000.0),
    ) -> ClosingStreamingResponse:
        try:
            callback = handler_factory(handler)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

        # The only change a route needs: attach harden(handler) instead of the handler.
        # (`harden_config(config)` does the same for every handler of a config.)
        attached: BaseCallbackHandler = harden(callback) if route == "safe" else callback
        config: RunnableConfig = {"callbacks": [attached]}

        record = StreamRecord(
            stream_id=f"{os.getpid()}-{next(ids)}-{uuid.uuid4().hex[:8]}",
            route=route,
            flavour=flavour,
            kind=handler,
            handler=attached,
        )
        if on_record is not None:
            on_record(record)

        async def finish() -> None:
            # Per-request hardened handlers: make sure what they were sent is delivered
            # (bounded) once the client already has the whole response.
            try:
                if route == "safe":
                    safe: Any = attached
                    record.flushed = await safe.aflush(timeout=flush_timeout)
                    record.stats = safe.stats()
            finally:
                record.finished.set()

        model = PacedFakeChatModel(messages=iter([make_text(words)]), delay=delay_ms / 1000)
        return ClosingStreamingResponse(
            _body(model, config, record),
            on_finish=finish,
            media_type="text/event-stream" if flavour == "sse" else "text/plain",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Stream-Id": record.stream_id,
            },
        )

    return app


if __name__ == "__main__":
    import uvicorn
    from opentelemetry import metrics

    provider = prometheus_meter_provider()
    if provider is not None:  # metrics at http://127.0.0.1:8000/metrics
        metrics.set_meter_provider(provider)
    uvicorn.run(create_app(), host="127.0.0.1", port=8000)
