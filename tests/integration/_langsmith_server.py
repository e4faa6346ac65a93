"""A local stand-in for the LangSmith API, and the run trees it received.

`FakeLangSmith` listens on 127.0.0.1 (ephemeral port) and accepts what the real
`langsmith.Client` sends while tracing: `GET /info`, `POST /runs/multipart` (optionally
gzip- or zstd-compressed), `POST /runs/batch`, `POST /runs` and `PATCH /runs/{id}`. Every
run operation is stored; `runs()` merges each run's post and patches by id, and
`traces()` turns them into one canonical list per trace in which parent links are paths
of names (ids never appear in a link), so two recordings of the same work compare equal.

`mode` makes the ingest endpoints misbehave on purpose: "hang" holds every POST/PATCH
for `hang_seconds` (or until `stop()`) before ingesting it, "error" answers 500.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._compare import scrub

try:  # the SDK only compresses when zstandard is importable
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")

#: Fields of a run that say where and when, not what: never part of a comparison.
RUN_NOISE = frozenset(
    {
        "id",
        "trace_id",
        "parent_run_id",
        "dotted_order",
        "start_time",
        "end_time",
        "child_run_ids",
        "child_runs",
    }
)


@dataclass
class RunOp:
    """One run operation as the server received it."""

    kind: str  # "post" or "patch"
    run_id: str
    fields: dict[str, Any]
    endpoint: str


@dataclass
class Request:
    method: str
    path: str
    status: int
    received: float = field(default_factory=time.monotonic)


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if not encoding or encoding == "identity":
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "zstd":
        if zstandard is None:
            raise ValueError("zstd body but zstandard is not installed")
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def _boundary(content_type: str) -> bytes:
    for piece in content_type.split(";"):
        key, _, value = piece.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode()
    raise ValueError(f"no boundary in {content_type!r}")


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str, bytes]]:
    """(name, content type, data) of every part of a multipart/form-data body."""
    delimiter = b"--" + _boundary(content_type)
    parts: list[tuple[str, str, bytes]] = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header block")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: dict[str, str] = {}
        for line in head.decode("utf-8").split("\r\n"):
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        name = ""
        for piece in headers.get("content-disposition", "").split(";"):
            key, _, value = piece.strip().partition("=")
            if key == "name":
                name = value.strip('"')
        parts.append((name, headers.get("content-type", ""), data))
    return parts


class FakeLangSmith:
    """A threaded HTTP server that records what a LangSmith client sends."""

    def __init__(self, *, zstd: bool = False) -> None:
        self.mode = "ok"  # "ok" | "hang" | "error"
        self.hang_seconds = 3.0
        self.zstd = zstd and zstandard is not None
        self.ops: list[RunOp] = []
        self.requests: list[Request] = []  # answered, with their status
        self.arrivals: list[Request] = []  # as they arrive, before any hang
        self.clients: list[Any] = []  # bookkeeping for tests: clients to retire
        self.unparsed: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeLangSmith:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so no handler thread outlives
            # its response waiting on an idle keep-alive socket.
            protocol_version = "HTTP/1.0"
            timeout = 30

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._handle(self, "GET")

            def do_POST(self) -> None:
                owner._handle(self, "POST")

            def do_PATCH(self) -> None:
                owner._handle(self, "PATCH")

            def do_PUT(self) -> None:
                owner._handle(self, "PUT")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = False  # server_close() joins the handler threads
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-langsmith",
            daemon=True,
        )
        self._thread.start()
        return self

    def recover(self) -> None:
        """Answer normally from now on, releasing any request held by "hang"."""
        self.mode = "ok"
        self._release.set()

    def stop(self) -> None:
        """Release hung requests, stop serving and join every server thread."""
        self.recover()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            assert not self._thread.is_alive(), "fake LangSmith server thread did not stop"

    def __enter__(self) -> FakeLangSmith:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------
    def _reply(self, handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/")
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._changed:
            self.arrivals.append(Request(method, path, 0))
            self._changed.notify_all()
        if method != "GET" and self.mode == "hang":
            self._release.wait(self.hang_seconds)  # then ingest as usual
        if method == "GET":
            status, payload = self._get(path)
        elif self.mode == "error":
            status, payload = 500, {"detail": "fake LangSmith is failing on purpose"}
        else:
            try:
                body = _decompress(raw, handler.headers.get("Content-Encoding", ""))
                status, payload = self._ingest(
                    method, path, body, handler.headers.get("Content-Type", "")
                )
            except Exception as error:  # a body this server cannot read fails the test
                with self._changed:
                    self.unparsed.append(f"{method} {path}: {error!r}")
                status, payload = 400, {"detail": repr(error)}
        with self._changed:
            self.requests.append(Request(method, path, status))
            self._changed.notify_all()
        self._reply(handler, status, payload)

    def _get(self, path: str) -> tuple[int, Any]:
        if path == "/info":
            return 200, {
                "version": "0.0.0-fake",
                "batch_ingest_config": {
                    "use_multipart_endpoint": True,
                    "scale_up_qsize_trigger": 1000,
                    "scale_up_nthreads_limit": 16,
                    "scale_down_nempty_trigger": 4,
                    "size_limit": 100,
                    "size_limit_bytes": 20_971_520,
                },
                "instance_flags": {"zstd_compression_enabled": self.zstd},
            }
        return 404, {"detail": f"GET {path} is not part of the fake"}

    def _ingest(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
        ops: list[RunOp] = []
        if method == "POST" and path == "/runs/multipart":
            ops = self._from_multipart(parse_multipart(body, content_type), path)
        elif method == "POST" and path == "/runs/batch":
            batch = json.loads(body)
            for kind in ("post", "patch"):
                for run in batch.get(kind) or []:
                    ops.append(RunOp(kind, str(run["id"]), run, path))
        elif method == "POST" and path == "/runs":
            run = json.loads(body)
            ops.append(RunOp("post", str(run["id"]), run, path))
        elif method == "PATCH" and path.startswith("/runs/"):
            run = json.loads(body)
            ops.append(RunOp("patch", path.rsplit("/", 1)[1], run, path))
        else:
            return 404, {"detail": f"{method} {path} is not part of the fake"}
        with self._changed:
            self.ops.extend(ops)
        return 202 if path == "/runs/multipart" else 200, {}

    @staticmethod
    def _from_multipart(parts: list[tuple[str, str, bytes]], endpoint: str) -> list[RunOp]:
        by_key: dict[tuple[str, str], dict[str, Any]] = {}
        order: list[tuple[str, str]] = []
        for name, _content_type, data in parts:
            pieces = name.split(".")
            if pieces[0] not in ("post", "patch") or len(pieces) not in (2, 3):
                continue  # attachments, feedback: not run fields
            key = (pieces[0], pieces[1])
            if key not in by_key:
                by_key[key] = {}
                order.append(key)
            value = json.loads(data)
            if len(pieces) == 2:
                by_key[key].update(value)
            else:
                by_key[key][pieces[2]] = value
        return [RunOp(kind, run_id, by_key[(kind, run_id)], endpoint) for kind, run_id in order]

    # -- reading what was received ---------------------------------------------------
    def wait_for(self, predicate: Callable[[FakeLangSmith], bool], timeout: float) -> bool:
        """Wait (bounded) until ``predicate(self)`` holds; False when the deadline passed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def take(self) -> list[RunOp]:
        """Every run operation received so far, removing them from the store."""
        with self._changed:
            ops, self.ops = self.ops, []
        return ops


def merge_runs(ops: list[RunOp]) -> dict[str, dict[str, Any]]:
    """Each run's fields, its post first and then its patches in arrival order."""
    runs: dict[str, dict[str, Any]] = {}
    for op in sorted(ops, key=lambda op: op.kind != "post"):  # stable: keeps arrival order
        run = runs.setdefault(op.run_id, {})
        for key, value in op.fields.items():
            if value is not None or key not in run:
                run[key] = value
    return runs


def post_counts(ops: list[RunOp]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        if op.kind == "post":
            counts[op.run_id] = counts.get(op.run_id, 0) + 1
    return counts


def parse_time(value: Any) -> datetime:
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def duration(run: dict[str, Any]) -> float:
    return (parse_time(run["end_time"]) - parse_time(run["start_time"])).total_seconds()


def traces(runs: dict[str, dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One list per trace, runs in start order, parent links as paths of names.

    Each run becomes ``{"path": "root#0/child#1", "parent": "root#0", **fields}`` without
    ids or timestamps (tags sorted, object addresses in reprs masked); a run whose parent
    never arrived keeps ``"parent": "<missing>"``.
    Traces are sorted by their content so concurrent roots (``.batch``) compare equal.
    """
    children: dict[str | None, list[dict[str, Any]]] = {}
    for run_id, run in runs.items():
        parent = run.get("parent_run_id")
        parent = str(parent) if parent is not None else None
        if parent is not None and parent not in runs:
            parent = "<missing>"
        children.setdefault(parent, []).append({**run, "id": run_id})
    for siblings in children.values():
        siblings.sort(key=lambda run: str(run.get("dotted_order") or run.get("start_time")))

    def walk(run: dict[str, Any], parent: str | None, index: int) -> Iterator[dict[str, Any]]:
        path = f"{run.get('name')}#{index}"
        if parent is not None:
            path = f"{parent}/{path}"
        record = {"path": path, "parent": parent}
        record.update({k: _normalize(v) for k, v in run.items() if k not in RUN_NOISE})
        if isinstance(record.get("tags"), list):
            record["tags"] = sorted(record["tags"])  # the tracer builds them from a set
        yield record
        for position, child in enumerate(children.get(run["id"], [])):
            yield from walk(child, path, position)

    result = []
    for root_parent in (None, "<missing>"):
        for index, root in enumerate(children.get(root_parent, [])):
            result.append(list(walk(root, root_parent, 0 if root_parent is None else index)))
    return sorted(result, key=lambda trace: json.dumps(_sortable(trace), sort_keys=True))


def _normalize(value: Any) -> Any:
    """``value`` with object addresses in reprs (``<... at 0x7f..>``) made stable."""
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, str):
        return ADDRESS_RE.sub(" at 0x<address>", value)
    return value


def _sortable(value: Any) -> Any:
    """``value`` without the per-run noise that must not decide the order of traces."""
    return scrub(value)


@contextmanager
def fake_langsmith(**options: Any) -> Iterator[FakeLangSmith]:
    server = FakeLangSmith(**options).start()
    try:
        yield server
    finally:
        server.stop()
