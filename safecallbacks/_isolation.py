"""Calling one hook so that nothing it raises escapes, except on purpose.

LangChain only catches ``Exception`` around a handler (and re-raises it when
``raise_error`` is set); ``CancelledError``, ``GeneratorExit`` and friends go
straight through and end the stream. Here every exception a handler raises is
turned into a recorded failure. Three things still pass on the caller's own
thread: ``StopStream`` (the deliberate exit), ``KeyboardInterrupt`` and
``SystemExit``, and a ``CancelledError`` while the caller's own task really is
being cancelled.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ._hooks import ignore_flag_for

Resolver = Callable[[str], Callable[..., Any]]


class StopStream(BaseException):
    """Raise from a handler to stop the run it is observing, deliberately.

    It derives from ``BaseException`` so that LangChain's own ``except
    Exception`` around handlers lets it through. In inline mode the caller of
    ``stream()``/``invoke()`` receives it at once; in offload mode it is raised
    into the same run at that run's next event.
    """

    def __init__(self, reason: str = "stopped by a callback handler") -> None:
        super().__init__(reason)
        self.reason = reason


def own_task_is_cancelling() -> bool:
    """True when the task running on this thread has a cancellation request pending."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop on this thread
        return False
    if task is None:
        return False
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling()) if cancelling is not None else False


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
    try:
        result = resolve(hook)(*args, **kwargs)
        return (await result) if inspect.isawaitable(result) else result
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
