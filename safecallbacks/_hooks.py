"""The catalogue of LangChain callback hooks, read from the installed langchain-core.

Nothing here is hard-coded per version: every public ``on_*`` method of
``BaseCallbackHandler`` is a hook, so a hook that a later langchain-core adds
(``on_stream_event`` arrived in 1.x) is hardened without a release of ours.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler


def _discover_hooks() -> tuple[str, ...]:
    names = (
        name
        for name, value in inspect.getmembers(BaseCallbackHandler)
        if name.startswith("on_") and callable(value)
    )
    return tuple(sorted(names))


HOOKS: tuple[str, ...] = _discover_hooks()
"""Every hook the installed langchain-core can call on a handler."""

IGNORE_FLAGS: tuple[str, ...] = tuple(
    sorted(
        name
        for name, value in inspect.getmembers(BaseCallbackHandler)
        if name.startswith("ignore_") and isinstance(value, property)
    )
)
"""The ``ignore_*`` properties LangChain reads before calling a hook."""

# Which ignore flag LangChain consults for each hook family. Used for the
# chat-model fallback and for documentation; LangChain itself reads the flags
# straight from the wrapper, which reads them through to the wrapped handler.
_FLAG_BY_PREFIX: tuple[tuple[str, str | None], ...] = (
    ("on_chat_model_", "ignore_chat_model"),
    ("on_llm_", "ignore_llm"),
    ("on_stream_event", "ignore_llm"),
    ("on_chain_", "ignore_chain"),
    ("on_tool_", "ignore_agent"),
    ("on_agent_", "ignore_agent"),
    ("on_retriever_", "ignore_retriever"),
    ("on_retry", "ignore_retry"),
    ("on_custom_event", "ignore_custom_event"),
    ("on_text", None),
)


def ignore_flag_for(hook: str) -> str | None:
    """The ``ignore_*`` flag LangChain checks before calling ``hook`` (None: none)."""
    for prefix, flag in _FLAG_BY_PREFIX:
        if hook.startswith(prefix):
            return flag
    return None


ERROR_HOOKS: frozenset[str] = frozenset(h for h in HOOKS if h.endswith("_error"))
"""Hooks that report a failing run; a pending StopStream is never raised into them."""


def _base_defaults() -> frozenset[Any]:
    defaults: set[Any] = set()
    for base in (BaseCallbackHandler, AsyncCallbackHandler):
        for hook in HOOKS:
            value = inspect.getattr_static(base, hook, None)
            if value is not None:
                defaults.add(value)
    return frozenset(defaults)


_DEFAULTS = _base_defaults()


def is_default_hook(value: object) -> bool:
    """True when ``value`` is one of langchain-core's own do-nothing hook bodies."""
    try:
        return value in _DEFAULTS
    except TypeError:  # unhashable callables are never the defaults
        return False


def implemented_hooks(handler: object) -> dict[str, Callable[..., Any] | Any]:
    """The hooks ``handler`` really implements, looked up statically.

    Hooks left at LangChain's default body are omitted: the default does
    nothing (or, for ``on_chat_model_start``, asks LangChain to fall back to
    ``on_llm_start``), so there is nothing to harden or deliver.
    """
    found: dict[str, Any] = {}
    for hook in HOOKS:
        value = inspect.getattr_static(handler, hook, None)
        if value is None or is_default_hook(value):
            continue
        found[hook] = value
    return found


def is_async_callable(value: Any) -> bool:
    """True for ``async def`` functions, also when wrapped as static/class methods."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return inspect.iscoroutinefunction(value)
