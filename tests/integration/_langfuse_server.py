"""A local fake Langfuse server for the Langfuse integration tests.

Langfuse 5 is OpenTelemetry based: the SDK's ``LangfuseSpanProcessor`` (a
``BatchSpanProcessor``) exports spans as OTLP/HTTP protobuf (gzip by default) to
``{base_url}/api/public/otel/v1/traces`` with Basic auth ``public_key:secret_key``.
The REST client may also call the project, health, ingestion, scores and media
endpoints; they are answered (and recorded) here too, so nothing leaves 127.0.0.1.

The server decodes every OTLP body into plain dicts (``SpanRecord``) and keeps them in
memory; ``span_forest`` turns a list of them into trees whose parent links are
structural (children nested under their parent), so two recordings compare without ids.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

OTLP_TRACES_PATH = "/api/public/otel/v1/traces"

SpanRecord = dict[str, Any]


def decode_any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the Python value it carries."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [decode_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def decode_attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key/value pairs as a dict."""
    decoded: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        decoded[pair.key] = decode_any_value(pair.value)
    return decoded


def decode_span(span: Span, scope: str, resource: Mapping[str, Any]) -> SpanRecord:
    """One OTLP span as a plain dict."""
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex() or None,
        "kind": Span.SpanKind.Name(span.kind),
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "attributes": decode_attributes(span.attributes),
        "status": {
            "code": Status.StatusCode.Name(span.status.code),
            "message": span.status.message,
        },
        "events": [
            {
                "name": e.name,
                "time_ns": e.time_unix_nano,
                "attributes": decode_attributes(e.attributes),
            }
            for e in span.events
        ],
        "links": len(span.links),
        "scope": scope,
        "resource": dict(resource),
    }


def decode_export_request(body: bytes, encoding: str | None) -> list[SpanRecord]:
    """Every span of an OTLP ``ExportTraceServiceRequest`` body (gzip or plain)."""
    if encoding and encoding.lower() == "gzip":
        body = gzip.decompress(body)
    request = ExportTraceServiceRequest.FromString(body)
    spans: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = decode_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            spans.extend(decode_span(s, scope, resource) for s in scope_spans.spans)
    return spans


def _json_attribute(value: Any) -> Any:
    """Langfuse serialises input/output/metadata as JSON strings: decode them for diffs."""
    if isinstance(value, str) and value[:1] in '[{"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def span_forest(
    spans: list[SpanRecord],
    *,
    drop_attributes: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The spans as trees: each node has its children nested, ordered by start time.

    Ids and timestamps are left out (parent links become the nesting itself); every
    other field (name, kind, attributes with JSON values decoded, status, events'
    names and attributes, scope) is kept. ``drop_attributes`` names attributes whose
    values are per-run noise (e.g. the completion start time).
    """
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        parent = span["parent_span_id"]
        children.setdefault(parent if parent in by_id else None, []).append(span)

    def node(span: SpanRecord) -> dict[str, Any]:
        kids = sorted(children.get(span["span_id"], []), key=lambda s: (s["start_ns"], s["name"]))
        return {
            "name": span["name"],
            "kind": span["kind"],
            "scope": span["scope"],
            "attributes": {
                k: _json_attribute(v)
                for k, v in sorted(span["attributes"].items())
                if k not in drop_attributes
            },
            "status": span["status"],
            "events": [{"name": e["name"], "attributes": e["attributes"]} for e in span["events"]],
            "has_remote_parent": span["parent_span_id"] is not None
            and span["parent_span_id"] not in by_id,
            "children": [node(k) for k in kids],
        }

    roots = sorted(children.get(None, []), key=lambda s: (s["start_ns"], s["name"]))
    return [node(r) for r in roots]


def walk(forest: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every node of a forest, depth first."""
    for tree in forest:
        yield tree
        yield from walk(tree["children"])


@dataclass
class RequestRecord:
    method: str
    path: str
    authorization: str | None
    content_encoding: str | None
    content_type: str | None
    started: float
    finished: float | None = None
    status: int | None = None
    spans: int = 0


@dataclass
class FakeLangfuse:
    """State of the fake server: recorded requests and spans, and how it answers."""

    public_key: str = "pk-test"
    secret_key: str = "sk-test"
    mode: str = "ok"  # "ok" | "hang" | "error"
    hang_seconds: float = 3.0
    spans: list[SpanRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    # -- reading the store -------------------------------------------------------------

    def take(self) -> list[SpanRecord]:
        """Every span received so far, and forget them."""
        with self.lock:
            spans, self.spans = self.spans, []
        return spans

    def snapshot(self) -> list[SpanRecord]:
        with self.lock:
            return list(self.spans)

    def wait_for(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 5.0
    ) -> list[SpanRecord]:
        """The stored spans once ``predicate`` holds for them, or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans) or time.monotonic() >= deadline:
                return spans
            time.sleep(0.01)

    def otlp_requests(self) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if r.path == OTLP_TRACES_PATH]

    def unexpected_requests(self) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if r.status == 404]

    def auth_ok(self, header: str | None) -> bool:
        token = base64.b64encode(f"{self.public_key}:{self.secret_key}".encode()).decode()
        return header == f"Basic {token}"

    # -- misbehaving on purpose --------------------------------------------------------

    def set_mode(self, mode: str, hang_seconds: float = 3.0) -> None:
        if mode not in ("ok", "hang", "error"):
            raise ValueError(f"unknown mode {mode!r}")
        self.hang_seconds = hang_seconds
        self.mode = mode
        if mode == "hang":
            self.release.clear()
        else:
            self.release.set()


def build_app(state: FakeLangfuse) -> FastAPI:
    app = FastAPI()

    async def misbehave(record: RequestRecord) -> Response | None:
        if state.mode == "hang":
            deadline = time.monotonic() + state.hang_seconds
            while time.monotonic() < deadline and not state.release.is_set():
                await asyncio.sleep(0.02)
        if state.mode == "error":
            record.status = 500
            return Response(status_code=500, content=b"boom")
        return None

    @app.middleware("http")
    async def record_requests(request: Request, call_next: Any) -> Response:
        record = RequestRecord(
            method=request.method,
            path=request.url.path,
            authorization=request.headers.get("authorization"),
            content_encoding=request.headers.get("content-encoding"),
            content_type=request.headers.get("content-type"),
            started=time.monotonic(),
        )
        with state.lock:
            state.requests.append(record)
        request.state.record = record
        response: Response | None = None
        try:
            response = await misbehave(record)
            if response is None:
                response = await call_next(request)
            return response
        finally:
            record.finished = time.monotonic()
            if record.status is None:
                record.status = response.status_code if response is not None else None

    @app.post(OTLP_TRACES_PATH)
    async def otlp_traces(request: Request) -> Response:
        if not state.auth_ok(request.headers.get("authorization")):
            return Response(status_code=401)
        body = await request.body()
        spans = decode_export_request(body, request.headers.get("content-encoding"))
        request.state.record.spans = len(spans)
        with state.lock:
            state.spans.extend(spans)
        return Response(
            content=ExportTraceServiceResponse().SerializeToString(),
            media_type="application/x-protobuf",
        )

    @app.get("/api/public/projects")
    async def projects() -> dict[str, Any]:
        return {"data": [{"id": "project-test", "name": "test", "metadata": {}}]}

    @app.get("/api/public/health")
    async def health() -> dict[str, Any]:
        return {"status": "OK", "version": "3.0.0"}

    @app.post("/api/public/ingestion")
    async def ingestion(request: Request) -> Response:
        body = await request.json()
        ids = [{"id": e.get("id"), "status": 201} for e in body.get("batch", [])]
        return Response(
            status_code=207,
            content=json.dumps({"successes": ids, "errors": []}),
            media_type="application/json",
        )

    @app.post("/api/public/scores")
    async def scores() -> dict[str, Any]:
        return {"id": "score-test"}

    @app.post("/api/public/media")
    async def media() -> dict[str, Any]:
        return {"mediaId": "media-test", "uploadUrl": None}

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything_else(rest: str) -> Response:
        return Response(status_code=404)

    return app


@contextlib.contextmanager
def serve_fake_langfuse(startup_timeout: float = 10.0) -> Iterator[tuple[str, FakeLangfuse]]:
    """Run the fake server on 127.0.0.1 (ephemeral port); yield its URL and state."""
    state = FakeLangfuse()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="fake-langfuse", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() >= deadline:
            raise RuntimeError("fake Langfuse server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        state.release.set()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("fake Langfuse server did not stop")
