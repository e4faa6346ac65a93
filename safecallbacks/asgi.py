"""One request scope per HTTP request, flushed after the response went out: plain ASGI.

Use it with any ASGI framework (no framework is imported here)::

    from safecallbacks.asgi import SafeCallbacksMiddleware

    app.add_middleware(SafeCallbacksMiddleware, flush_timeout=2.0)   # Starlette, FastAPI
    app = SafeCallbacksMiddleware(app, flush_timeout=2.0)            # any ASGI app

Each HTTP (or websocket) request runs in its own ``safecallbacks.scope()``.
The application sends its whole response first; only then does the middleware
wait, at most ``flush_timeout`` seconds, for the hardened handlers' events of
that request's runs. The client never waits for it, and a serverless instance
frozen right after the call loses nothing that could be delivered in time.
What could not be is logged once per request (``scope_flush_timed_out``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._logs import logger
from ._scope import Scope, aflush_or_report, check_timeout

__all__ = ["SafeCallbacksMiddleware"]

ASGIScope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, Receive, Send], Awaitable[None]]

_SCOPED_TYPES = frozenset({"http", "websocket"})


class SafeCallbacksMiddleware:
    """ASGI middleware: a request scope per request, flushed after its response.

    ``flush_timeout``: how long, at most, the ASGI call goes on after the
    response's last message to deliver the request's events (seconds).
    """

    def __init__(self, app: ASGIApp, *, flush_timeout: float = 2.0) -> None:
        if not callable(app):
            raise TypeError(
                f"safecallbacks: SafeCallbacksMiddleware needs an ASGI app, got {app!r}"
            )
        check_timeout(flush_timeout, "flush_timeout")
        self.app = app
        self.flush_timeout = float(flush_timeout)

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in _SCOPED_TYPES:  # lifespan and the like: nothing to flush
            await self.app(scope, receive, send)
            return
        where = f"{scope.get('method', scope.get('type'))} {scope.get('path', '')}".strip()
        with Scope() as request:
            try:
                await self.app(scope, receive, send)
            finally:
                await self._flush(request, where)

    async def _flush(self, request: Scope, where: str) -> None:
        try:
            await aflush_or_report(request, self.flush_timeout, where)
        except asyncio.CancelledError:
            # The server cancelled the request's task (a client gone, a shutdown): say
            # what was left, then let the cancellation go on.
            left = request.stats()
            logger().warning("scope_flush_cancelled", where=where, pending=left.pending)
            raise
