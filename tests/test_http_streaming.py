"""End-to-end: the FastAPI example over real HTTP, direct and behind a real nginx.

The bare routes reproduce the production failures (a raising handler kills the response, a
handler stuck for 2 s gets the stream cut by nginx's ``proxy_read_timeout 1s``); the hardened
routes deliver every token in both cases. A client hanging up mid-stream must end the
server-side generator, after which the hardened handler flushes to ``pending == 0``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests._http_support import (
    LOOPBACK,
    NginxProcess,
    UvicornThread,
    find_nginx,
    load_example,
    run_nginx,
    run_uvicorn,
)

pytestmark = pytest.mark.timeout(120)

WORDS = 40  # 79 chunks: 40 words plus the 39 spaces between them
DELAY_MS = 5.0  # so a whole response takes about 0.4 s
STALL_SECONDS = 2.0  # StallingHandler's default, longer than nginx's 1 s read timeout
CLIENT_TIMEOUT = httpx.Timeout(15.0)
FLUSH_TIMEOUT = 5.0
EVENT_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@dataclass
class App:
    module: ModuleType
    server: UvicornThread
    records: dict[str, Any] = field(default_factory=dict)

    def record(self, stream_id: str | None) -> Any:
        assert stream_id is not None, "response carried no X-Stream-Id header"
        return self.records[stream_id]


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    module = load_example()
    records: dict[str, Any] = {}
    lock = threading.Lock()

    def keep(record: Any) -> None:
        with lock:
            records[record.stream_id] = record

    asgi = module.create_app(flush_timeout=FLUSH_TIMEOUT, on_record=keep)
    with run_uvicorn(asgi) as server:
        yield App(module=module, server=server, records=records)


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    binary = find_nginx()
    if binary is None:
        message = (
            "nginx is not installed (expected /usr/sbin/nginx); "
            "install it with: apt-get update && apt-get install -y nginx"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def proxy(app: App, nginx_binary: str) -> Iterator[NginxProcess]:
    with run_nginx(nginx_binary, app.server.port, read_timeout="1s") as nginx:
        yield nginx


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int | None
    stream_id: str | None
    raw: str
    error: BaseException | None
    elapsed: float


async def fetch(base_url: str, path: str, **params: Any) -> Fetched:
    """GET a streaming route and read it to the end; transport errors are returned."""
    assert base_url.startswith(f"http://{LOOPBACK}:"), base_url
    status: int | None = None
    stream_id: str | None = None
    parts: list[str] = []
    error: BaseException | None = None
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT, trust_env=False) as c:
        try:
            async with c.stream("GET", path, params=params) as response:
                status = response.status_code
                stream_id = response.headers.get("x-stream-id")
                async for text in response.aiter_text():
                    parts.append(text)
        except httpx.TransportError as exc:  # connection cut mid-body, protocol error, ...
            error = exc
    return Fetched(status, stream_id, "".join(parts), error, time.monotonic() - started)


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Complete SSE events in ``raw``; a trailing partial event is ignored."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in raw.split("\n\n")[:-1]:
        name, data = "message", ""
        for line in block.split("\n"):
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data += value
        events.append((name, json.loads(data) if data else {}))
    return events


def body_text(flavour: str, raw: str) -> tuple[str, bool]:
    """The streamed text and whether the response said it was complete."""
    if flavour == "stream":
        return raw, True  # plain text has no end marker: completeness is judged by the text
    events = parse_sse(raw)
    text = "".join(str(data["token"]) for name, data in events if name == "token")
    return text, bool(events) and events[-1][0] == "end"


def expected_text(app: App) -> str:
    text: str = app.module.make_text(WORDS)
    return text


def assert_whole(app: App, flavour: str, got: Fetched) -> None:
    assert got.error is None, f"stream failed: {got.error!r} after {len(got.raw)} chars"
    assert got.status == 200
    text, ended = body_text(flavour, got.raw)
    assert text == expected_text(app)
    assert ended, "SSE stream has no closing `end` event"


def assert_cut_off(app: App, flavour: str, got: Fetched) -> None:
    text, ended = body_text(flavour, got.raw)
    failed = got.error is not None or (got.status is not None and got.status >= 500)
    assert failed, f"expected a broken response, got {got.status} and {len(got.raw)} chars"
    assert text != expected_text(app) or not ended
    assert len(text) < len(expected_text(app))


async def wait_event(event: threading.Event, what: str, timeout: float = EVENT_TIMEOUT) -> None:
    if not await asyncio.to_thread(event.wait, timeout):
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


async def assert_flushed_clean(record: Any) -> None:
    """The app's own post-response flush succeeded and the stats add up."""
    await wait_event(record.finished, "the app's post-response flush")
    assert record.flushed is True
    stats = record.stats
    assert stats is not None
    assert stats.pending == 0
    assert stats.emitted == stats.delivered + stats.failed + stats.dropped + stats.skipped


# --------------------------------------------------------------------------------------------
# Direct to uvicorn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["stream", "sse"])
async def test_bare_route_dies_on_raising_handler(app: App, flavour: str) -> None:
    got = await fetch(app.server.base_url, f"/bare/{flavour}", handler="raise", words=WORDS)
    assert_cut_off(app, flavour, got)
    if got.stream_id is not None:
        record = app.record(got.stream_id)
        await wait_event(record.generator_closed, "the server-side generator to end")
        assert isinstance(record.error, RuntimeError)
        assert record.chunks_sent == 0  # LangChain re-raised at the very first token


@pytest.mark.parametrize("flavour", ["stream", "sse"])
async def test_bare_route_waits_for_stalling_handler(app: App, flavour: str) -> None:
    # Control for the nginx test below: bare, the 2 s stall sits inside the stream.
    got = await fetch(app.server.base_url, f"/bare/{flavour}", handler="stall", words=WORDS)
    assert_whole(app, flavour, got)
    assert got.elapsed >= STALL_SECONDS * 0.95


@pytest.mark.parametrize("flavour", ["stream", "sse"])
@pytest.mark.parametrize("kind", ["raise", "stall"])
async def test_hardened_route_arrives_whole(app: App, flavour: str, kind: str) -> None:
    got = await fetch(
        app.server.base_url, f"/safe/{flavour}", handler=kind, words=WORDS, delay_ms=DELAY_MS
    )
    assert_whole(app, flavour, got)
    if kind == "stall":
        # ~0.4 s of tokens; waiting on the handler would have taken more than 2 s.
        assert got.elapsed < STALL_SECONDS * 0.75, f"stream took {got.elapsed:.2f}s"

    record = app.record(got.stream_id)
    assert record.completed and record.error is None
    await assert_flushed_clean(record)
    if kind == "raise":
        # Every token event failed, or was skipped once the circuit breaker opened.
        stats = record.stats
        assert stats.failed >= 1
        assert stats.failed + stats.skipped >= record.chunks_sent


# --------------------------------------------------------------------------------------------
# Behind nginx (proxy_buffering off, proxy_read_timeout 1s)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["stream", "sse"])
async def test_nginx_cuts_bare_route_with_stalling_handler(
    app: App, proxy: NginxProcess, flavour: str
) -> None:
    got = await fetch(proxy.base_url, f"/bare/{flavour}", handler="stall", words=WORDS)
    assert got.status == 200  # headers and the first tokens did get through
    assert got.raw, "nothing arrived before the stall"
    assert_cut_off(app, flavour, got)
    assert "upstream timed out" in proxy.error_log()

    record = app.record(got.stream_id)
    await wait_event(record.generator_closed, "the server-side generator to end")
    assert not record.completed


@pytest.mark.parametrize("flavour", ["stream", "sse"])
@pytest.mark.parametrize("kind", ["raise", "stall"])
async def test_nginx_passes_hardened_route_whole(
    app: App, proxy: NginxProcess, flavour: str, kind: str
) -> None:
    got = await fetch(
        proxy.base_url, f"/safe/{flavour}", handler=kind, words=WORDS, delay_ms=DELAY_MS
    )
    assert_whole(app, flavour, got)
    record = app.record(got.stream_id)
    assert record.completed
    await assert_flushed_clean(record)


# --------------------------------------------------------------------------------------------
# Client disconnect
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["bare", "safe"])
@pytest.mark.parametrize("flavour", ["stream", "sse"])
async def test_client_disconnect_ends_server_stream(app: App, route: str, flavour: str) -> None:
    words = 5_000  # ~50 s of tokens: the stream cannot end on its own during the test
    stream_id: str | None = None
    received = 0
    async with (
        httpx.AsyncClient(
            base_url=app.server.base_url, timeout=CLIENT_TIMEOUT, trust_env=False
        ) as client,
        client.stream(
            "GET", f"/{route}/{flavour}", params={"handler": "count", "words": words}
        ) as response,
    ):
        assert response.status_code == 200
        stream_id = response.headers.get("x-stream-id")
        async for text in response.aiter_text():
            received += len(text)
            if received >= 100:
                break
        # Leaving both blocks closes the half-read connection.

    record = app.record(stream_id)
    await wait_event(record.generator_closed, "the server-side generator to end")
    assert not record.completed
    assert 0 < record.chunks_sent < 2 * words - 1

    if route == "safe":
        safe = record.handler
        assert await asyncio.to_thread(safe.flush, FLUSH_TIMEOUT)
        stats = safe.stats()
        assert stats.pending == 0
        assert stats.emitted == stats.delivered + stats.failed + stats.dropped + stats.skipped
        assert stats.delivered >= record.chunks_sent
        await assert_flushed_clean(record)
    else:
        await wait_event(record.finished, "the response to finish")
