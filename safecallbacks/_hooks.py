"""The hooks a handler's class understands, read from the installed packages.

Nothing here is hard-coded per version: every public ``on_*`` method of
``BaseCallbackHandler`` is a hook, so a hook that a later langchain-core adds
(``on_stream_event`` arrived in 1.x) is hardened without a release of ours.
Framework base classes add their own (LangGraph's ``GraphCallbackHandler``
has ``on_interrupt`` and ``on_resume``): see ``class_hooks``. Nothing here runs
on the token path.
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
START_HOOKS: frozenset[str] = frozenset(h for h in HOOKS if h.endswith("_start"))
END_HOOKS: frozenset[str] = frozenset(h for h in HOOKS if h.endswith(("_end", "_error")))
"""Hooks that end a run: where stop marks die and ``settle`` waits for the backlog."""
PAIRED_HOOKS: frozenset[str] = START_HOOKS | END_HOOKS
"""Hooks whose runs an open breaker must still let end (a start was delivered)."""


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


_MISSING = object()


def _defined_in(cls: type, hook: str, value: Any) -> type | None:
    """The class of ``cls``'s MRO whose own namespace holds ``value`` as ``hook``."""
    for klass in cls.__mro__:
        if vars(klass).get(hook, _MISSING) is value:
            return klass
    return None


def _is_framework_declaration(cls: type, hook: str, value: Any) -> bool:
    """True when ``value`` is a framework base's own declaration of ``hook``, not an override.

    That is: it is defined by a class from another top-level package than ``cls``
    that introduces ``hook`` (none of that class's own bases defines it), like
    ``GraphCallbackHandler.on_interrupt``'s do-nothing body. A library class that
    overrides a hook a framework base declares (``LibTracer(GraphCallbackHandler)``
    with its own ``on_interrupt``) implements it, whichever package the class
    finally hardened comes from.
    """
    owner = _defined_in(cls, hook, value)
    if owner is None or _top_package(owner) == _top_package(cls):
        return False
    return not any(hook in vars(base) for base in owner.__mro__[1:])


def _top_package(cls: type) -> str:
    return cls.__module__.split(".", 1)[0]


def _framework_hooks(cls: type) -> set[str]:
    """``on_*`` methods declared by handler base classes from another package than ``cls``.

    A framework that extends the callback protocol does it with a base class
    users derive from (LangGraph's ``GraphCallbackHandler``); the ``on_*``
    methods such a base declares are hooks the framework calls. Methods named
    ``on_*`` in the user's own package are just methods.
    """
    own = _top_package(cls)
    found: set[str] = set()
    for base in cls.__mro__[1:]:
        if not issubclass(base, BaseCallbackHandler) or _top_package(base) == own:
            continue
        if base.__module__.startswith("safecallbacks"):
            continue
        for name, value in vars(base).items():
            if name.startswith("on_") and (callable(value) or isinstance(value, staticmethod)):
                found.add(name)
    return found


def class_hooks(cls: type) -> tuple[str, ...]:
    """Every hook instances of ``cls`` can be called with: LangChain's and its frameworks'."""
    return tuple(sorted(set(HOOKS) | _framework_hooks(cls)))


def hooks_on_instance(handler: Any) -> list[str]:
    """Hooks set on the instance itself: LangChain calls those, past its class's."""
    own = getattr(handler, "__dict__", {})
    return [hook for hook in class_hooks(type(handler)) if hook in own]


def instance_hooks_error(handler: Any, hooks: list[str]) -> TypeError:
    name = type(handler).__qualname__
    found = ", ".join(f"{name}.{hook}" for hook in hooks)
    verb = "is" if len(hooks) == 1 else "are"
    return TypeError(
        f"cannot harden {name}: {found} {verb} set on the instance, and LangChain calls "
        "what the instance has, so it would run unhardened (its failures and stalls reaching "
        f"the stream); define it as a method of the class instead: def {hooks[0]}(self, ...)"
    )


def _static_lookup(cls: type, hook: str, look_past: Callable[[Any], bool]) -> Any:
    for klass in cls.__mro__:
        value = vars(klass).get(hook)
        if value is not None and not look_past(value):
            return value
    return None


def implemented_hooks(
    handler: object, look_past: Callable[[Any], bool] | None = None
) -> dict[str, Callable[..., Any] | Any]:
    """The hooks ``handler`` (an instance or a class) really implements, looked up statically.

    Hooks left at LangChain's default body are omitted: the default does
    nothing (or, for ``on_chat_model_start``, asks LangChain to fall back to
    ``on_llm_start``), so there is nothing to harden or deliver. So are a
    framework base's own do-nothing bodies. ``look_past`` skips class
    attributes that stand in for a hook without implementing it.
    """
    cls = handler if isinstance(handler, type) else type(handler)
    found: dict[str, Any] = {}
    for hook in class_hooks(cls):
        if look_past is None:
            value = inspect.getattr_static(handler, hook, None)
        else:
            value = _static_lookup(cls, hook, look_past)
        if value is None or is_default_hook(value):
            continue
        if hook not in HOOKS and _is_framework_declaration(cls, hook, value):
            continue  # the framework's own do-nothing declaration
        found[hook] = value
    return found


def is_async_callable(value: Any) -> bool:
    """True for ``async def`` functions, also when wrapped as static/class methods."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return inspect.iscoroutinefunction(value)
