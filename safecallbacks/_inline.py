"""Inline delivery: the handler runs in the caller, isolated.

For tracers and collectors read right after a call (``mode="inline"``, or
what ``auto`` picks for them): the hook runs on the emitting thread or task,
in the caller's own context, so timestamps, context it sets and results are
exactly as bare. Nothing escapes (``_isolation``); async hooks are awaited as
LangChain would await the bare handler, bounded by ``timeout``. This is the
token path by design: guarantee 2 ("nothing stalls") does not hold here.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from ._isolation import (
    Resolver,
    acall_hook,
    call_hook,
    finish_awaitable,
    passes_through_caller,
    run_bounded,
    run_here,
)
from ._observe import Batch, Observer
from ._options import Options

_now = time.monotonic

PLAIN_RESULTS: set[type] = {type(None), bool, int, str}
"""Types a hook returned that are known not to be awaitable (checked once per type)."""


class InlineOwner(Protocol):
    """What inline calls need from the engine that owns them."""

    target: object
    resolve: Resolver
    options: Options
    observer: Observer
    emitted: itertools.count[int]
    inline_counts: dict[str, itertools.count[int]]
    bare_run_inline: bool
    failing: bool

    def accept(self, hook: str, kwargs: Mapping[str, Any]) -> bool: ...

    def check_stall(self, hook: str, started: float) -> None: ...

    def await_elsewhere(self, awaitable: Any, loop: asyncio.AbstractEventLoop | None) -> None: ...


class InlineCalls:
    """Calling one engine's handler in the caller, and accounting for each call at once."""

    __slots__ = ("engine",)

    def __init__(self, engine: InlineOwner) -> None:
        self.engine = engine

    def call(
        self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException | None:
        """Call the hook here; return what it raised (already accounted for), if anything."""
        run_id = kwargs.get("run_id")
        if not self.engine.observer.admit(hook, run_id):
            return None
        started = _now()
        error: BaseException | None = None
        engine = self.engine
        try:
            result = call_hook(engine.resolve, engine.target, hook, args, kwargs)
            if result is not None and isinstance(result, Awaitable):
                # An async hook from sync code: awaited to its end, with LangChain's
                # on_llm_start fallback should the coroutine raise NotImplementedError.
                engine.await_elsewhere(
                    finish_awaitable(result, engine.resolve, engine.target, hook, args, kwargs),
                    None,
                )
        except BaseException as exc:
            error = exc
        engine.check_stall(hook, started)
        self._settle(hook, run_id, error, started, args, kwargs)
        return error

    async def acall(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Inline mode on the async path: LangChain awaits this, so the handler is awaited here.

        Exactly as LangChain would run the bare handler: a ``run_inline`` handler
        in the caller's own task and context (context it sets is seen by later
        hooks), any other in a task of its own with a copy of the context (which
        also lets the loop run other tasks between events, as consumers of
        ``AsyncIteratorCallbackHandler`` rely on). ``timeout`` bounds it.
        """
        if not self.engine.accept(hook, kwargs):
            return
        run_id = kwargs.get("run_id")
        if not self.engine.observer.admit(hook, run_id):
            return
        started = _now()
        coro = acall_hook(self.engine.resolve, self.engine.target, hook, args, kwargs)
        if self.engine.bare_run_inline:  # LangChain would await it in the caller's task
            error = await run_here(coro, self.engine.options.timeout)
        else:  # LangChain would gather it: a task of its own, in a copy of the context
            error = await run_bounded(coro, contextvars.copy_context(), self.engine.options.timeout)
        self.engine.check_stall(hook, started)
        self._settle(hook, run_id, error, started, args, kwargs)

    def result(
        self, hook: str, result: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The inline fast path's hook returned something: an awaitable is run to its end."""
        if not isinstance(result, Awaitable):
            if len(PLAIN_RESULTS) < 256:
                PLAIN_RESULTS.add(type(result))  # e.g. a tracer's Run: never check it again
            next(self.engine.inline_counts[hook])
            return
        engine = self.engine
        try:
            engine.await_elsewhere(
                finish_awaitable(result, engine.resolve, engine.target, hook, args, kwargs), None
            )
        except BaseException as exc:
            self.failed(hook, exc, args, kwargs)
            return
        next(self.engine.inline_counts[hook])

    def failed(
        self, hook: str, exc: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The inline fast path's handler raised ``exc``: account, fall back, or pass it on."""
        next(self.engine.emitted)
        self.engine.failing = True
        run_id = kwargs.get("run_id")
        at = _now()
        if hook == "on_chat_model_start" and isinstance(exc, NotImplementedError):
            # LangChain's own fallback: the handler gets on_llm_start instead.
            fallback: BaseException | None = None
            try:
                call_hook(self.engine.resolve, self.engine.target, hook, args, kwargs)
            except BaseException as again:
                fallback = again
            self._settle(hook, run_id, fallback, at, args, kwargs)
            return
        self._settle(hook, run_id, exc, at, args, kwargs)

    def _settle(
        self,
        hook: str,
        run_id: object,
        error: BaseException | None,
        started: float,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> None:
        """Account for one inline call at once; an error meant for the caller goes on to it."""
        passes = error is not None and passes_through_caller(error)
        batch = Batch()
        observer = self.engine.observer
        observer.add_result(
            batch, hook, run_id, None if passes else error, started, started, args, kwargs
        )
        observer.commit(batch)
        if passes:
            assert error is not None
            raise error
