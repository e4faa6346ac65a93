"""Calling one hook, sync or async, so that nothing it raises escapes or outlives its timeout.

LangChain only catches ``Exception`` around a handler (and re-raises it when
``raise_error`` is set); ``CancelledError``, ``GeneratorExit`` and friends go
straight through and end the stream. Here every exception a handler raises is
turned into a recorded failure. Three things still pass on the caller's own
thread: ``StopStream`` (the deliberate exit), ``KeyboardInterrupt`` and
``SystemExit``, and a ``CancelledError`` while the caller's own task really is
being cancelled.

Every catch and every timeout of the package is here: the sync call with
LangChain's ``on_llm_start`` fallback, its async twin, and the three ways an
async hook is run (in the caller's task, as a task of its own, or stepped
inside a consumer task). On the token path only for inline handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
from collections.abc import Callable, Mapping
from types import CoroutineType
from typing import Any

from ._hooks import ignore_flag_for
from ._stopping import StopStream

Resolver = Callable[[str], Callable[..., Any]]


def own_task_is_cancelling() -> bool:
    """True when the task running on this thread has a cancellation request pending."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop on this thread
        return False
    return task is not None and task.cancelling() > 0


def passes_through_caller(exc: BaseException) -> bool:
    """True when ``exc`` must reach the code that emitted the event."""
    if isinstance(exc, (StopStream, KeyboardInterrupt, SystemExit)):
        return True
    if isinstance(exc, asyncio.CancelledError):
        return own_task_is_cancelling()
    return False


def error_type(exc: BaseException) -> str:
    """The name used for ``exc`` in stats, logs and metric attributes."""
    return type(exc).__qualname__


def read_flag(handler: object, flag: str) -> tuple[bool, BaseException | None]:
    """Read an ``ignore_*`` flag; a flag that raises reads as False (deliver)."""
    try:
        return bool(getattr(handler, flag)), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return False, exc


def _as_llm_start(
    args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # LangChain's own fallback renders each batch of messages as one prompt string.
    from langchain_core.messages import get_buffer_string

    serialized, messages, *rest = args
    prompts = [get_buffer_string(batch) for batch in messages]
    return (serialized, prompts, *rest), dict(kwargs)


def _llm_start_fallback_wanted(hook: str, target: object) -> bool:
    if hook != "on_chat_model_start":
        return False
    flag = ignore_flag_for("on_llm_start")
    return flag is None or not read_flag(target, flag)[0]


def call_hook(
    resolve: Resolver,
    target: object,
    hook: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """Call a sync hook with LangChain's semantics; exceptions propagate.

    A handler whose ``on_chat_model_start`` raises ``NotImplementedError`` gets
    ``on_llm_start`` with the messages rendered as strings, as LangChain would
    give it, unless it ignores LLM events.
    """
    try:
        return resolve(hook)(*args, **kwargs)
    except NotImplementedError:
        if hook != "on_chat_model_start":
            raise
        if not _llm_start_fallback_wanted(hook, target):
            return None
    llm_args, llm_kwargs = _as_llm_start(args, kwargs)
    return resolve("on_llm_start")(*llm_args, **llm_kwargs)


async def acall_hook(
    resolve: Resolver,
    target: object,
    hook: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """The async twin of ``call_hook``: awaits whatever the hook returns."""
    return await finish_awaitable(
        _called(resolve, hook, args, kwargs), resolve, target, hook, args, kwargs
    )


async def _called(
    resolve: Resolver, hook: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    result = resolve(hook)(*args, **kwargs)
    return (await result) if inspect.isawaitable(result) else result


async def finish_awaitable(
    awaitable: Any,
    resolve: Resolver,
    target: object,
    hook: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """Await what a hook returned; one that raises ``NotImplementedError`` (when called or
    when awaited) as ``on_chat_model_start`` falls back to ``on_llm_start``, as LangChain's
    does."""
    try:
        return await awaitable
    except NotImplementedError:
        if not _llm_start_fallback_wanted(hook, target):
            if hook != "on_chat_model_start":
                raise
            return None
    llm_args, llm_kwargs = _as_llm_start(args, kwargs)
    result = resolve("on_llm_start")(*llm_args, **llm_kwargs)
    return (await result) if inspect.isawaitable(result) else result


class Contained(Exception):
    """Carries ``KeyboardInterrupt`` or ``SystemExit`` out of a task.

    asyncio re-raises those two from a task straight through the event loop,
    which would end the user's ``asyncio.run`` (or our background loop)
    because a handler misbehaved. Wrapped, they come back as a task result.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


async def contained(awaitable: Any) -> Any:
    """Await ``awaitable`` (any awaitable) so that nothing it raises can stop a loop."""
    try:
        return await awaitable
    except (KeyboardInterrupt, SystemExit) as exc:
        raise Contained(exc) from None


def unwrap(exc: BaseException) -> BaseException:
    return exc.original if isinstance(exc, Contained) else exc


# --- running an async hook ---------------------------------------------------------


async def run_here(coro: Any, timeout: float) -> BaseException | None:
    """Await a handler coroutine in the caller's own task; return what it raised, if anything.

    Used for inline async hooks, so context the hook sets stays visible to the
    caller's later hooks, as it would bare. Past ``timeout`` it is cancelled and
    reported as a ``TimeoutError``. A real cancellation of the caller's task
    passes through.
    """
    limit = asyncio.timeout(timeout)
    try:
        async with limit:
            await coro
    except TimeoutError as exc:
        if not limit.expired():
            return exc  # the handler's own TimeoutError
        if own_task_is_cancelling():
            raise
        return TimeoutError(f"async hook exceeded timeout={timeout}s")
    except asyncio.CancelledError as exc:
        if own_task_is_cancelling():
            raise
        return exc
    except BaseException as exc:
        return unwrap(exc)
    return None


async def run_bounded(
    coro: Any, context: contextvars.Context, timeout: float
) -> BaseException | None:
    """Run a handler coroutine as a task in ``context``; return what it raised, if anything.

    The task is never awaited directly: a task that ends with ``GeneratorExit``
    is thrown into its awaiter with *close* semantics, which would silently
    close our own coroutines. Past ``timeout`` it is cancelled and reported as
    a ``TimeoutError``; if the handler ignores the cancellation we still move on.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(contained(coro), context=context)
    finished: asyncio.Future[None] = loop.create_future()
    timed_out = False

    def wake(_: object) -> None:
        if not finished.done():
            finished.set_result(None)

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        task.cancel()
        wake(None)

    task.add_done_callback(wake)
    timer = loop.call_later(timeout, expire)
    try:
        await finished
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        timer.cancel()
    if timed_out:
        return TimeoutError(f"async hook exceeded timeout={timeout}s")
    if task.cancelled():
        return asyncio.CancelledError()
    error = task.exception()
    return None if error is None else unwrap(error)


class _Timeout(Exception):
    """Raised by ``_Drive`` once the handler's time is up and it has been closed."""


class _Drive:
    """Runs the rest of a handler coroutine inside the awaiting task, each step in its context.

    A task per event costs more than most async handlers do; stepping the
    coroutine here needs no task, no future and no extra loop iteration. The
    awaiting consumer task passes on whatever the handler waits for, exactly
    as it would for its own awaits.
    """

    __slots__ = ("closing", "context", "coro", "cut_off", "first", "on_cut_off", "timed_out")

    def __init__(
        self, coro: Any, first: Any, context: contextvars.Context, on_cut_off: Callable[[], None]
    ) -> None:
        self.coro, self.first, self.context = coro, first, context
        self.timed_out = False
        self.closing = False  # the consumer itself is being closed (its loop is gone)
        self.cut_off = False  # the consumer itself is being cancelled (its loop shuts down)
        self.on_cut_off = on_cut_off

    def __await__(self) -> Any:
        coro, run = self.coro, self.context.run
        value = self.first
        while True:
            try:
                sent = yield value
            except BaseException as thrown:
                if thrown.__class__ is GeneratorExit:
                    # Not the handler's doing: the consumer is discarded with its loop.
                    # Close the handler with it and let the consumer end, uncounted
                    # here (the lane's reaping counts the event as dropped).
                    self.closing = True
                    with contextlib.suppress(BaseException):
                        run(coro.close)
                    raise
                if self.timed_out:
                    self._cancel_for_timeout(thrown)
                elif not self.cut_off and own_task_is_cancelling():
                    # A handler that swallows this would hold the shutdown for its whole
                    # timeout: from here on it only has the exit budget.
                    self.cut_off = True
                    self.on_cut_off()
                try:
                    value = run(coro.throw, thrown)
                except StopIteration:
                    return
                continue
            try:
                value = run(coro.send, sent)
            except StopIteration:
                return

    def _cancel_for_timeout(self, cancellation: BaseException) -> None:
        """Cancel the handler as asyncio would; if it carries on regardless, close it."""
        try:
            self.context.run(self.coro.throw, cancellation)
        except BaseException:  # finished, cancelled or failed: either way it is over
            raise _Timeout from None
        with contextlib.suppress(RuntimeError):  # it ignored GeneratorExit too: move on
            self.coro.close()
        raise _Timeout


class Suspended:
    """A handler coroutine that did not finish in its first step: what is left to drive."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro, self.first = coro, first


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def first_step(
    call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    context: contextvars.Context,
) -> BaseException | Suspended | None:
    """Call an async hook in ``context`` and run it up to its first suspension, no task needed.

    Returns None when it finished, what it raised, or a ``Suspended`` for
    ``drive_rest`` to carry on with. Most handlers finish in their first step,
    and then delivering them costs no task, no future and no loop iteration.
    """
    try:
        result = context.run(call, *args, **kwargs)
    except BaseException as exc:
        return exc
    if result is None:
        return None
    if result.__class__ is not CoroutineType:
        if not inspect.isawaitable(result):
            return None
        result = _awaited(result)
    try:
        first = context.run(result.send, None)
    except StopIteration:
        return None
    except BaseException as exc:
        return exc
    return Suspended(result, first)


async def drive_rest(
    suspended: Suspended, context: contextvars.Context, timeout: float, grace: float
) -> BaseException | None:
    """Step a suspended handler coroutine to its end within the current task.

    Past ``timeout`` the handler is closed and a ``TimeoutError`` returned.
    Cancelling the current task still cancels it: that cancellation is passed
    into the handler, then re-raised; a handler that ignores it is closed after
    ``grace`` seconds (the exit budget) and the cancellation re-raised all the same,
    as it is when such a handler then finishes or fails on its own: the shutdown cut
    it off, so its event is dropped, never delivered or failed.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def expire() -> None:
        drive.timed_out = True
        task.cancel()

    timer = loop.call_later(timeout, expire)

    def cut_off() -> None:
        nonlocal timer
        if timer.when() - loop.time() > grace:
            timer.cancel()
            timer = loop.call_later(grace, expire)

    drive = _Drive(suspended.coro, suspended.first, context, cut_off)
    try:
        await drive
    except _Timeout:
        task.uncancel()
        if drive.cut_off:
            raise asyncio.CancelledError from None  # it was the consumer's shutdown all along
        return TimeoutError(f"async hook exceeded timeout={timeout}s")
    except asyncio.CancelledError as exc:
        if own_task_is_cancelling():
            raise  # the consumer itself is being cancelled: pass it on
        return exc  # the handler cancelled itself
    except BaseException as exc:
        if drive.closing:
            raise
        if drive.cut_off:  # it swallowed the shutdown, then failed: cut off all the same
            raise asyncio.CancelledError from None
        return exc
    finally:
        timer.cancel()
    if drive.cut_off:
        # It swallowed its loop's shutdown and finished all the same: what it did after
        # that was cut short, so the event counts as dropped, and the shutdown goes on.
        raise asyncio.CancelledError
    return None
