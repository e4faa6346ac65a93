"""``safecallbacks.asgi.SafeCallbacksMiddleware`` over real HTTP: real Starlette, uvicorn, httpx.

Each request streams a real ``GenericFakeChatModel`` through a hardened (offload) handler. An
outer ASGI callable around the middleware records the handler's state at the very moment the
middleware's call returns, which is when a serverless platform may freeze the instance: by
then every event of that request must have been delivered (or ``flush_timeout`` has passed
and one warning says so), while the client got its last byte without waiting for any of it.

The handlers are hardened with ``settle=0``, so a run's end never waits for its backlog and
only the middleware's flush can account for the events being delivered at return time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from langchain_core.callbacks import BaseCallbackHandler
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

import safecallbacks
from safecallbacks._runs import CURRENT_SCOPE
from safecallbacks.asgi import SafeCallbacksMiddleware
from safecallbacks.testing import fake_chat_model
from tests._http_support import LOOPBACK, UvicornThread, run_uvicorn, wait_until

pytestmark = pytest.mark.timeout(120)

ASGIScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, Receive, Send], Awaitable[None]]

GATE_TIMEOUT = 10.0  # a gated hook gives up after this, so a failing test never hangs
WAIT = 10.0  # bound of every wait for something the server does
CLIENT_TIMEOUT = httpx.Timeout(15.0)


def chunks_of(words: int) -> int:
    """Chunks ``fake_chat_model(tokens=words)`` streams: the words and the spaces between."""
    return 2 * words - 1


def text_of(words: int) -> str:
    return " ".join(f"w{i}" for i in range(words))


# --------------------------------------------------------------------------------------------
# The handler
# --------------------------------------------------------------------------------------------


class GatedHandler(BaseCallbackHandler):
    """Counts tokens and ends per request (a run's tag); may hold tokens on a gate.

    ``block``: ``None`` holds nothing, ``"*"`` holds every token, any other value the tokens
    of runs tagged with it. A held token waits for ``release()`` (at most GATE_TIMEOUT), then
    is counted. ``delay`` is work each token takes.
    """

    def __init__(self, block: str | None = None, delay: float = 0.0) -> None:
        self.block = block
        self.delay = delay
        self.gate = threading.Event()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self._tokens: dict[str, int] = {}
        self._ends: dict[str, int] = {}

    def release(self) -> None:
        self.gate.set()

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        tags: list[str] = kwargs.get("tags") or []
        if self.block == "*" or (self.block is not None and self.block in tags):
            self.entered.set()
            self.gate.wait(GATE_TIMEOUT)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            for tag in tags:
                self._tokens[tag] = self._tokens.get(tag, 0) + 1

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        with self._lock:
            for tag in kwargs.get("tags") or []:
                self._ends[tag] = self._ends.get(tag, 0) + 1

    def tokens(self, rid: str) -> int:
        with self._lock:
            return self._tokens.get(rid, 0)

    def ends(self, rid: str) -> int:
        with self._lock:
            return self._ends.get(rid, 0)


def hardened(block: str | None = None, delay: float = 0.0) -> GatedHandler:
    return safecallbacks.harden(GatedHandler(block, delay), mode="offload", settle=0)


# --------------------------------------------------------------------------------------------
# The app, and the outer callable that watches the middleware's call return
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The handler as it was at one moment, for one request."""

    tokens: int
    ends: int
    pending: int
    gate_open: bool


@dataclass(frozen=True)
class Returned:
    """The middleware's call for request ``rid`` returned at ``at``."""

    rid: str
    at: float
    last_body_at: float | None  # when the response's last body message was sent
    state: Snapshot


@dataclass
class Served:
    handler: GatedHandler
    server: UvicornThread
    emitted: dict[str, int]
    returns: list[Returned] = field(default_factory=list)

    def returned(self, rid: str) -> Returned | None:
        found = [r for r in list(self.returns) if r.rid == rid]
        assert len(found) <= 1, found
        return found[0] if found else None

    def wait_returned(self, rid: str, timeout: float = WAIT) -> Returned:
        wait_until(
            lambda: self.returned(rid) is not None,
            timeout=timeout,
            what=f"the ASGI call of request {rid!r} to return",
        )
        found = self.returned(rid)
        assert found is not None
        return found

    def fetch(self, client: httpx.Client, rid: str, words: int) -> str:
        """GET a stream and read it to its last byte."""
        with client.stream("GET", f"/stream/{rid}", params={"tokens": words}) as response:
            assert response.status_code == 200
            return "".join(response.iter_text())


def snapshot(handler: GatedHandler, rid: str) -> Snapshot:
    return Snapshot(
        tokens=handler.tokens(rid),
        ends=handler.ends(rid),
        pending=safecallbacks.stats(handler).pending,
        gate_open=handler.gate.is_set(),
    )


def streaming_app(handler: GatedHandler, emitted: dict[str, int]) -> Starlette:
    """``GET /stream/{rid}?tokens=N``: a fake chat model's stream, its runs tagged ``rid``."""

    async def stream(request: Request) -> StreamingResponse:
        rid = request.path_params["rid"]
        model = fake_chat_model(tokens=int(request.query_params["tokens"]))
        emitted[rid] = 0

        async def body() -> Any:
            config: Any = {"callbacks": [handler], "tags": [rid]}
            async for chunk in model.astream("hi", config=config):
                emitted[rid] += 1
                yield str(chunk.content)

        return StreamingResponse(body(), media_type="text/plain")

    return Starlette(routes=[Route("/stream/{rid}", stream)])


def watched(app: ASGIApp, handler: GatedHandler, returns: list[Returned]) -> ASGIApp:
    """``app``, recording the handler's state for the request when ``app``'s call returns."""

    async def outer(scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        rid = scope["path"].rsplit("/", 1)[-1]
        last_body: list[float] = []

        async def watch_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                last_body.append(time.monotonic())

        try:
            await app(scope, receive, watch_send)
        finally:
            # Taken synchronously, on the loop, the moment the call returned.
            state = snapshot(handler, rid)
            at = time.monotonic()
            returns.append(Returned(rid, at, last_body[0] if last_body else None, state))

    return outer


@contextlib.contextmanager
def serve(
    handler: GatedHandler, *, flush_timeout: float, add_middleware: bool = False
) -> Iterator[Served]:
    """Serve the streaming app behind the middleware (wrapped directly, or added to
    Starlette), watched from outside, with a real uvicorn on loopback."""
    emitted: dict[str, int] = {}
    returns: list[Returned] = []
    inner = streaming_app(handler, emitted)
    if add_middleware:
        inner.add_middleware(SafeCallbacksMiddleware, flush_timeout=flush_timeout)
        app: ASGIApp = inner
    else:
        app = SafeCallbacksMiddleware(inner, flush_timeout=flush_timeout)
    with run_uvicorn(watched(app, handler, returns)) as server:
        yield Served(handler=handler, server=server, emitted=emitted, returns=returns)


def http_client(served: Served) -> httpx.Client:
    base_url = served.server.base_url
    assert base_url.startswith(f"http://{LOOPBACK}:"), base_url
    return httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT, trust_env=False)


@contextlib.contextmanager
def released(handler: GatedHandler) -> Iterator[GatedHandler]:
    """Release the handler's gate on the way out, whatever happened (before the server stops)."""
    try:
        yield handler
    finally:
        handler.release()


@contextlib.contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """``structlog.testing.capture_logs``, leaving structlog unconfigured if it was.

    (capture_logs leaves structlog configured, which would send later tests' lines to
    stdout instead of the stdlib logger ``safecallbacks``.)
    """
    was_configured = structlog.is_configured()
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        if not was_configured:
            structlog.reset_defaults()


def drained(handler: GatedHandler) -> None:
    """Wait (bounded) until the handler has nothing pending, so no test leaves work behind."""
    wait_until(
        lambda: safecallbacks.stats(handler).pending == 0,
        timeout=WAIT + GATE_TIMEOUT,
        what="the handler to drain",
    )


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_the_client_gets_its_last_byte_without_waiting_for_the_flush() -> None:
    handler = hardened(block="*")
    words = 10
    with (
        serve(handler, flush_timeout=WAIT) as served,
        released(handler),
        http_client(served) as client,
    ):
        text = served.fetch(client, "one", words)

        # The client has read the whole response while the handler still holds the first
        # token: nothing it does can be waited for by the client.
        assert text == text_of(words)
        assert served.emitted["one"] == chunks_of(words)
        wait_until(handler.entered.is_set, timeout=WAIT, what="the handler to hold a token")
        assert not handler.gate.is_set()
        assert handler.tokens("one") < served.emitted["one"]
        assert handler.ends("one") == 0
        assert served.returned("one") is None, "the ASGI call returned before its events"

        handler.release()
        returned = served.wait_returned("one")

    # The moment the ASGI call returned, every event of the request had been delivered.
    assert returned.state == Snapshot(tokens=chunks_of(words), ends=1, pending=0, gate_open=True), (
        returned
    )
    assert returned.last_body_at is not None and returned.at >= returned.last_body_at


def test_when_the_call_returns_every_event_of_the_request_was_delivered() -> None:
    handler = hardened(delay=0.002)  # about 2 ms a token: slower than the stream
    words = 30
    with (
        serve(handler, flush_timeout=WAIT, add_middleware=True) as served,
        http_client(served) as client,
    ):
        for i in range(4):
            rid = f"seq{i}"
            assert served.fetch(client, rid, words) == text_of(words)
            returned = served.wait_returned(rid)
            assert served.emitted[rid] == chunks_of(words) == 59
            assert returned.state == Snapshot(
                tokens=chunks_of(words), ends=1, pending=0, gate_open=False
            ), (rid, returned)
            assert returned.last_body_at is not None and returned.at >= returned.last_body_at
    assert [r.rid for r in served.returns] == [f"seq{i}" for i in range(4)]


def test_a_hung_handler_delays_the_return_by_flush_timeout_and_is_logged_once() -> None:
    handler = hardened(block="*")
    words = 5
    with (
        captured_logs() as logs,
        serve(handler, flush_timeout=0.3) as served,
        released(handler),
        http_client(served) as client,
    ):
        assert served.fetch(client, "hung", words) == text_of(words)
        returned = served.wait_returned("hung")

        # It returned on its own, the handler still hung: after about flush_timeout.
        assert not returned.state.gate_open
        assert returned.state.tokens == 0 and returned.state.ends == 0
        assert returned.last_body_at is not None
        waited = returned.at - returned.last_body_at
        assert 0.25 <= waited <= 3.0, waited

        timed_out = [e for e in logs if e["event"] == "scope_flush_timed_out"]
        assert len(timed_out) == 1, timed_out
        entry = timed_out[0]
        assert entry["log_level"] == "warning"
        assert entry["where"] == "GET /stream/hung"
        assert entry["timeout_s"] == 0.3
        assert entry["pending"] == chunks_of(words) + 1, entry  # every token and the end
        assert entry["pending_by_hook"]["on_llm_new_token"] > 0, entry
        assert sum(entry["pending_by_hook"].values()) == entry["pending"], entry

        handler.release()
        drained(handler)
    assert handler.tokens("hung") == chunks_of(words) and handler.ends("hung") == 1
    assert len([e for e in logs if e["event"] == "scope_flush_timed_out"]) == 1, logs


def test_a_request_returns_without_waiting_for_another_requests_slow_events() -> None:
    handler = hardened(block="B")  # slow only for request B's runs
    words = 10
    with (
        serve(handler, flush_timeout=WAIT) as served,
        released(handler),
        http_client(served) as client_a,
        http_client(served) as client_b,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        fetching_b = pool.submit(served.fetch, client_b, "B", words)
        wait_until(handler.entered.is_set, timeout=WAIT, what="request B's first token held")

        assert served.fetch(client_a, "A", words) == text_of(words)
        a = served.wait_returned("A", timeout=GATE_TIMEOUT / 2)

        # A returned with all its events delivered, while B's were held and B's call went on.
        assert served.emitted["A"] == chunks_of(words)
        assert (a.state.tokens, a.state.ends, a.state.gate_open) == (chunks_of(words), 1, False)
        assert a.state.pending > 0, "B's events should still be pending"
        assert handler.tokens("B") < chunks_of(words)
        assert served.returned("B") is None

        handler.release()
        assert fetching_b.result(timeout=WAIT) == text_of(words)
        b = served.wait_returned("B")
    assert served.emitted["B"] == chunks_of(words)
    assert b.state == Snapshot(tokens=chunks_of(words), ends=1, pending=0, gate_open=True), b
    assert a.at < b.at


def test_lifespan_passes_through_untouched_and_bad_arguments_are_refused() -> None:
    seen: list[tuple[ASGIScope, Receive, Send, Any]] = []

    async def app(scope: ASGIScope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send, CURRENT_SCOPE.get()))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be sent: {message!r}")

    middleware = SafeCallbacksMiddleware(app, flush_timeout=0.5)
    lifespan: ASGIScope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    asyncio.run(middleware(lifespan, receive, send))
    assert len(seen) == 1
    scope, got_receive, got_send, current = seen[0]
    assert scope is lifespan and got_receive is receive and got_send is send
    assert lifespan == {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    assert current is None, "a lifespan call must not run in a request scope"

    # The contrast: an HTTP call does run in a request scope of its own.
    http: ASGIScope = {"type": "http", "method": "GET", "path": "/x"}
    asyncio.run(middleware(http, receive, send))
    assert len(seen) == 2 and seen[1][0] is http
    assert isinstance(seen[1][3], safecallbacks.Scope)
    assert CURRENT_SCOPE.get() is None

    assert SafeCallbacksMiddleware(app).flush_timeout == 2.0
    assert SafeCallbacksMiddleware(app, flush_timeout=0).flush_timeout == 0.0
    for negative in (-1, -0.001, math.nan):
        with pytest.raises(ValueError, match="flush_timeout"):
            SafeCallbacksMiddleware(app, flush_timeout=negative)
    for wrong in ("x", None, True):
        with pytest.raises(TypeError, match="flush_timeout"):
            SafeCallbacksMiddleware(app, flush_timeout=wrong)  # type: ignore[arg-type]
    for not_an_app in (None, 42, "app"):
        with pytest.raises(TypeError, match="ASGI app"):
            SafeCallbacksMiddleware(not_an_app)  # type: ignore[arg-type]
