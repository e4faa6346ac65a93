"""A local fake Sentry ingest server for the Sentry integration tests.

The SDK's ``HttpTransport`` POSTs every envelope to ``/api/<project>/envelope/`` with an
``X-Sentry-Auth`` header naming the DSN's public key, gzip-compressed by default (brotli
when the ``brotli`` module is installed). An envelope is newline-delimited: one header
line of JSON, then for each item a JSON item header and its payload (``length`` bytes
when the header gives it, else up to the next newline).

The server (a threaded ``http.server`` on 127.0.0.1) decodes every envelope and keeps
its items in memory, stored BEFORE the response is sent, so once ``sentry_sdk.flush()``
returned (the transport got its response) the items are here. ``span_tree`` turns a
transaction into one tree whose parent links are structural, so two transactions
compare without ids.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PUBLIC_KEY = "public"
PROJECT_ID = "1"
ENVELOPE_PATH = f"/api/{PROJECT_ID}/envelope/"

Item = dict[str, Any]


@dataclass
class Request:
    """One request as received, for the checks on what the SDK sent."""

    method: str
    path: str
    auth: str
    encoding: str
    error: str | None = None


def decompress(body: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]  # only sent when installed

        return bytes(brotli.decompress(body))
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


def parse_envelope(data: bytes) -> tuple[dict[str, Any], list[Item]]:
    """The envelope header and its items, each ``{"type", "headers", "payload"}``."""
    header_line, _, rest = data.partition(b"\n")
    header = json.loads(header_line) if header_line.strip() else {}
    items: list[Item] = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item_header = json.loads(item_line)
        length = item_header.get("length")
        if length is None:
            raw, _, rest = rest.partition(b"\n")
        else:
            raw, rest = rest[:length], rest[length:]
            rest = rest.removeprefix(b"\n")
        try:
            payload: Any = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        items.append({"type": item_header.get("type"), "headers": item_header, "payload": payload})
    return header, items


@dataclass
class FakeSentry:
    """What the fake server received, envelope by envelope; thread-safe, bounded waits."""

    requests: list[Request] = field(default_factory=list)
    envelopes: list[list[Item]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, request: Request, items: list[Item]) -> None:
        with self._changed:
            self.requests.append(request)
            self.envelopes.append(items)
            self._changed.notify_all()

    def item_types(self) -> list[str]:
        with self._changed:
            return [str(i["type"]) for envelope in self.envelopes for i in envelope]

    def wait_for_transaction(self, trace_id: str, timeout: float) -> dict[str, Any] | None:
        """The trace's transaction with all its spans, waiting at most ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [t for t in map(whole_transaction, self.envelopes) if t is not None]
                found = [t for t in found if t["contexts"]["trace"]["trace_id"] == trace_id]
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found[-1] if found else None
                self._changed.wait(remaining)

    def streamed_trace(self, trace_id: str, timeout: float) -> dict[str, Any] | None:
        """A streamed trace (``trace_lifecycle="stream"``) as a transaction would hold it.

        Spans come as ``span`` items, batched, each on its own once ended; the segment
        (root) span is the transaction. Waits at most ``timeout`` for the segment.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                spans = [
                    v1_span(span) | {"is_segment": span.get("is_segment")}
                    for envelope in self.envelopes
                    for item in envelope
                    if item["type"] == "span" and isinstance(item["payload"], dict)
                    for span in item["payload"].get("items", [])
                    if span.get("trace_id") == trace_id
                ]
                segments = [s for s in spans if s["is_segment"]]
                remaining = deadline - time.monotonic()
                if segments or remaining <= 0:
                    break
                self._changed.wait(remaining)
        if not segments:
            return None
        (segment,) = segments
        return {
            "transaction": segment["description"],
            "start_timestamp": segment["start_timestamp"],
            "timestamp": segment["timestamp"],
            "contexts": {
                "trace": {
                    "trace_id": trace_id,
                    "span_id": segment["span_id"],
                    "op": segment["op"],
                    "status": segment["status"],
                    "data": segment["data"],
                }
            },
            "spans": [s for s in spans if not s["is_segment"]],
        }

    def problems(self) -> list[str]:
        """Requests that were not well-formed envelopes for this DSN."""
        found = []
        for r in self.requests:
            if r.method != "POST" or r.path != ENVELOPE_PATH:
                found.append(f"unexpected {r.method} {r.path}")
            elif f"sentry_key={PUBLIC_KEY}" not in r.auth:
                found.append(f"no sentry_key in X-Sentry-Auth: {r.auth!r}")
            elif r.error:
                found.append(f"undecodable envelope ({r.encoding}): {r.error}")
        return found


def whole_transaction(envelope: list[Item]) -> dict[str, Any] | None:
    """The envelope's transaction with its ``gen_ai.*`` spans put back in its span list.

    The SDK sends ``gen_ai.*`` spans apart from the transaction's other spans: as a
    ``span`` item (span v2 format, attributes typed) in the same envelope.
    """
    transactions = [i["payload"] for i in envelope if i["type"] == "transaction"]
    if not transactions:
        return None
    transaction = dict(transactions[0])
    spans = list(transaction.get("spans", []))
    for item in envelope:
        if item["type"] == "span" and isinstance(item["payload"], dict):
            spans.extend(v1_span(span) for span in item["payload"].get("items", []))
    transaction["spans"] = spans
    return transaction


def v1_span(span: dict[str, Any]) -> dict[str, Any]:
    """A span v2 item in the transaction span format (op, description, data...)."""
    attributes = {k: v.get("value") for k, v in span.get("attributes", {}).items()}
    return {
        "trace_id": span.get("trace_id"),
        "span_id": span.get("span_id"),
        "parent_span_id": span.get("parent_span_id"),
        "op": attributes.pop("sentry.op", None),
        "description": span.get("name"),
        "origin": attributes.pop("sentry.origin", None),
        "status": span.get("status"),
        "start_timestamp": span.get("start_timestamp"),
        "timestamp": span.get("end_timestamp"),
        "data": attributes,
    }


def _handler_class(store: FakeSentry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
            request = Request("POST", self.path, self.headers.get("X-Sentry-Auth") or "", encoding)
            items: list[Item] = []
            try:
                _, items = parse_envelope(decompress(body, encoding))
            except Exception as exc:  # recorded, and reported by the test
                request.error = f"{type(exc).__name__}: {exc}"
            store.add(request, items)  # stored before answering: flush() implies received
            self._answer(200, b'{"id":"00000000000000000000000000000000"}')

        def do_GET(self) -> None:
            store.add(Request("GET", self.path, self.headers.get("X-Sentry-Auth") or "", ""), [])
            self._answer(404, b"{}")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows failures, not access logs

    return Handler


@contextlib.contextmanager
def serve_fake_sentry() -> Iterator[tuple[str, FakeSentry]]:
    """A fake Sentry on 127.0.0.1 (free port); yields ``(dsn, store)``; stops on exit."""
    store = FakeSentry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(store))
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-sentry"
    )
    thread.start()
    try:
        port = server.server_address[1]
        yield f"http://{PUBLIC_KEY}@127.0.0.1:{port}/{PROJECT_ID}", store
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)


# -- transactions as trees ----------------------------------------------------------------


SpanNode = dict[str, Any]


def span_tree(transaction: dict[str, Any], keep: Callable[[str], bool]) -> SpanNode:
    """The transaction as a tree of spans (children in start order), ids dropped.

    ``keep(key)`` selects the span fields compared (op, description, data...). Each
    span says how far it lies ``outside_parent`` in seconds (0.0 when it started no
    earlier and ended no later than its parent, give or take the microsecond rounding). A
    span whose parent is not in the transaction is put under the root, marked
    ``"parent": "<missing>"``.
    """
    trace = transaction["contexts"]["trace"]
    root: SpanNode = {
        "op": trace.get("op"),
        "description": transaction.get("transaction"),
        "status": trace.get("status"),
        "data": trace.get("data", {}),
        "children": [],
    }
    times = {trace["span_id"]: _interval(transaction)}
    nodes: dict[str, SpanNode] = {trace["span_id"]: root}
    spans = sorted(transaction.get("spans", []), key=lambda s: seconds(s["start_timestamp"]))
    for span in spans:
        nodes[span["span_id"]] = {**{k: v for k, v in span.items() if keep(k)}, "children": []}
        times[span["span_id"]] = _interval(span)
    for span in spans:
        node = nodes[span["span_id"]]
        parent_id = span.get("parent_span_id") or ""
        parent = nodes.get(parent_id)
        if parent is None:
            node["parent"] = "<missing>"
            parent_id, parent = trace["span_id"], root
        (start, end), (parent_start, parent_end) = times[span["span_id"]], times[parent_id]
        outside = max(parent_start - start, end - parent_end)
        node["outside_parent"] = outside if outside > SLACK else 0.0
        parent["children"].append(node)
    return root


SLACK = 2e-6
"""Timestamps are sent to the microsecond, as ISO text or as float seconds."""


def _interval(span: dict[str, Any]) -> tuple[float, float]:
    end = span.get("timestamp")
    return seconds(span["start_timestamp"]), seconds(end) if end is not None else float("inf")


def seconds(timestamp: float | str) -> float:
    """A span timestamp (epoch seconds, or ISO 8601 in the transaction format) in seconds."""
    if isinstance(timestamp, str):
        return datetime.fromisoformat(timestamp).timestamp()
    return float(timestamp)


def walk(node: SpanNode) -> Iterator[SpanNode]:
    """Depth first, parents before children."""
    yield node
    for child in node["children"]:
        yield from walk(child)
