"""Which delivery each kind of handler gets under ``mode="auto"``, and what is never wrapped.

Both rules are data: dotted class names matched against a handler's MRO, so
optional packages are never imported to decide. Users extend them with
``register_inline`` and ``register_plumbing``. Nothing here runs on the token
path: the choice is made once, when a handler is hardened.

* Inline (isolated, in the caller): tracers, which stamp start and end times
  when the hook runs (offloaded, a 500 ms LLM run was recorded as 89 ms) and
  whose SDKs already export on background threads; and in-memory collectors
  that users read right after a call returns.
* Offload: everything else.
* Never wrapped: LangChain's and LangGraph's own plumbing, which must run
  exactly as it does (stream handlers, the idle-timeout handler).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from . import _compat
from ._compat import fork_safe

INLINE_BY_DEFAULT: list[str] = [
    # tracers
    "langchain_core.tracers.base.BaseTracer",
    "langchain_core.tracers.base.AsyncBaseTracer",
    "langfuse.langchain.CallbackHandler.LangchainCallbackHandler",
    "opentelemetry.instrumentation.langchain.callback_handler.TraceloopCallbackHandler",
    # collectors read right after a call
    "langchain_core.callbacks.usage.UsageMetadataCallbackHandler",
    "langchain_core.callbacks.stdout.StdOutCallbackHandler",
    "langchain_core.callbacks.streaming_stdout.StreamingStdOutCallbackHandler",
    "langchain_core.callbacks.file.FileCallbackHandler",
    "langchain_classic.callbacks.streaming_aiter.AsyncIteratorCallbackHandler",
    "langchain.callbacks.streaming_aiter.AsyncIteratorCallbackHandler",
]

PLUMBING: list[str] = [
    # with_listeners(): the user's listeners are meant to run (and raise) as written
    "langchain_core.tracers.root_listeners.RootListenersTracer",
    "langchain_core.tracers.root_listeners.AsyncRootListenersTracer",
]

PLUMBING_PACKAGES = ("langchain_core", "langgraph")
"""A handler whose nearest class from these packages is ``_``-named is plumbing."""

_lock = fork_safe(threading.Lock())


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _names(targets: Iterable[type | str], function: str) -> list[str]:
    names = []
    for target in targets:
        if isinstance(target, str) and target.strip():
            names.append(target.strip())
        elif isinstance(target, type):
            names.append(dotted_name(target))
        else:
            raise TypeError(
                f"{function}() expects handler classes or dotted class names "
                f"('package.module.Class'), got {target!r}"
            )
    return names


def register_inline(*targets: type | str) -> None:
    """Have ``mode="auto"`` run these handler classes (and subclasses) inline."""
    names = _names(targets, "register_inline")
    with _lock:
        INLINE_BY_DEFAULT.extend(n for n in names if n not in INLINE_BY_DEFAULT)


def register_plumbing(*targets: type | str) -> None:
    """Never harden these handler classes (and subclasses), whichever way in."""
    names = _names(targets, "register_plumbing")
    with _lock:
        PLUMBING.extend(n for n in names if n not in PLUMBING)


def _matches(cls: type, names: list[str]) -> bool:
    wanted = set(names)
    return any(dotted_name(klass) in wanted for klass in cls.__mro__)


def auto_mode(cls: type) -> str:
    """The delivery ``mode="auto"`` picks for instances of ``cls``."""
    return "inline" if _matches(cls, INLINE_BY_DEFAULT) else "offload"


def is_plumbing(cls: type) -> bool:
    """True for handler classes that belong to the framework and must not be wrapped."""
    base = _compat.STREAMING_HANDLER_BASE
    if base is not None and base in cls.__mro__:
        return True  # astream_events, astream_log, LangGraph's stream modes
    for klass in cls.__mro__:
        if klass.__module__.split(".", 1)[0] in PLUMBING_PACKAGES:
            # The nearest framework class decides: private means plumbing (LangGraph's
            # idle-timeout handler), public means a handler meant for users (a tracer).
            if klass.__qualname__.startswith("_"):
                return True
            break
    return _matches(cls, PLUMBING)
