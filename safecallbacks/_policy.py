"""Which delivery each kind of handler gets under ``mode="auto"``, and what is never wrapped.

The rule rests on what a handler is, read from its class once, when it is
hardened (nothing here runs on the token path). First match wins:

1. classes registered with ``register_inline`` / ``register_offload``;
2. LangChain tracers (``BaseTracer``, ``AsyncBaseTracer``) run inline: they
   stamp run times when a hook runs, and their SDKs export in the background;
3. a hook that publishes context (sets a ``ContextVar``, makes a span current)
   runs inline: the code after it must see that context;
4. handlers whose hooks do an installed library's work (the library's own
   handler, or an application subclass extending it through ``super()``) run
   inline: a library's handler is written for its caller's thread, context and
   timing (tracing SDKs, usage collectors, UI frameworks' session-bound handlers);
5. the application's own handlers are offloaded: that is where hooks do
   blocking I/O of their own.

What a handler does during its first events can still move it (``_adapt``):
an inline handler that stalls its caller once is offloaded from then on; an
offloaded one that turns out to publish context, or that fails off the
caller's thread but not on it, is brought inline. Nothing is ever wrapped of
LangChain's and LangGraph's own plumbing (stream handlers, the idle-timeout
handler).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _compat
from ._compat import fork_safe
from ._hooks import implemented_hooks
from ._signals import application_hooks, context_writer, library_hooks

INLINE_BY_DEFAULT: list[str] = []
"""Dotted class names ``register_inline`` added: always inline under ``auto``."""

OFFLOAD_BY_DEFAULT: list[str] = []
"""Dotted class names ``register_offload`` added: always offloaded under ``auto``."""

TRACER_BASES = (
    "langchain_core.tracers.base.BaseTracer",
    "langchain_core.tracers.base.AsyncBaseTracer",
)


@dataclass(frozen=True)
class Decision:
    """What ``auto`` picked for a class, why, and whether its first events may revise it."""

    mode: str
    reason: str
    adaptive: bool = True  # False for registrations: the user decided


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
        _registrations[0] += 1


def register_offload(*targets: type | str) -> None:
    """Have ``mode="auto"`` offload these handler classes (and subclasses)."""
    names = _names(targets, "register_offload")
    with _lock:
        OFFLOAD_BY_DEFAULT.extend(n for n in names if n not in OFFLOAD_BY_DEFAULT)
        _registrations[0] += 1


def register_plumbing(*targets: type | str) -> None:
    """Never harden these handler classes (and subclasses), whichever way in."""
    names = _names(targets, "register_plumbing")
    with _lock:
        PLUMBING.extend(n for n in names if n not in PLUMBING)


def _matches(cls: type, names: list[str]) -> bool:
    wanted = set(names)
    return any(dotted_name(klass) in wanted for klass in cls.__mro__)


def auto_mode(cls: type) -> str:
    """The delivery ``mode="auto"`` picks for instances of ``cls`` (before any event)."""
    return decide(cls).mode


_decided: dict[tuple[type, int], Decision] = {}
_registrations = [0]  # bumped by every register_*: earlier decisions are stale


def decide(cls: type) -> Decision:
    """``auto``'s choice for ``cls`` and the reason, in a few words a user can check."""
    key = (cls, _registrations[0])
    found = _decided.get(key)
    if found is None:
        wrapped = cls.__dict__.get("_sc_wrapped_class")  # a metaclass may have wrapped it
        found = _decide(wrapped if isinstance(wrapped, type) else cls)
        with _lock:
            if len(_decided) > 4096:  # classes made per request must not pile up
                _decided.clear()
            _decided[key] = found
    return found


def _decide(cls: type) -> Decision:
    if _matches(cls, OFFLOAD_BY_DEFAULT):
        return Decision("offload", "registered with register_offload", adaptive=False)
    if _matches(cls, INLINE_BY_DEFAULT):
        return Decision("inline", "registered with register_inline", adaptive=False)
    if _matches(cls, list(TRACER_BASES)):
        return Decision("inline", "a LangChain tracer: it times runs as its hooks run")
    hooks = _own_hooks(cls)
    writer = context_writer(cls, hooks)
    if writer is not None:
        hook, call = writer
        return Decision("inline", f"{hook} publishes context ({call}) for the code after it")
    library = library_hooks(cls, hooks)
    if library or not hooks:
        top = (library[0][1] if library else cls.__module__).split(".", 1)[0]
        return Decision("inline", f"a library's handler ({top}): written to run in its caller")
    hook, module = application_hooks(cls, hooks)[0]
    return Decision("offload", f"the application's own code ({module}.{hook}): it may block")


def _own_hooks(cls: type) -> Mapping[str, Any]:
    resolved: Mapping[str, Any] | None = cls.__dict__.get("_sc_resolved")
    if resolved:
        return resolved
    return implemented_hooks(cls)


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
