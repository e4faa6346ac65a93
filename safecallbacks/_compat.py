"""Every private or version-specific API the package leans on, in one place.

Each name here either has a fallback that keeps the package correct (only
slower or less precise) or fails loudly where silence would change what a
handler does. ``tests/test_compat.py`` pins each one against the installed
versions, so an upgrade that moves a private name breaks a test, not a stream.
Nothing here runs on the token path except ``get_running_loop``,
``called_by_async_manager`` and ``count_value`` (stats reads).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import sys
from types import CodeType, FrameType
from typing import Any, TypeVar

import langchain_core.callbacks.manager as _lc_manager
from opentelemetry import metrics

get_running_loop = asyncio._get_running_loop
"""The running loop of this thread or None, without raising (a C fast path)."""


def _streaming_name(name: str) -> Any:
    try:
        module = importlib.import_module("langchain_core.tracers._streaming")
    except ImportError:  # pragma: no cover - very old langchain-core
        return None
    return getattr(module, name, None)


def _required_streaming_base() -> Any:
    """The plumbing rule rests on this class: without it, fail at import, never wrap silently.

    Were it missing, ``astream_events``/``astream_log`` and LangGraph's stream
    handlers would no longer be recognised and would be hardened like any handler.
    """
    found = _streaming_name("_StreamingCallbackHandler")
    if found is None:
        import langchain_core

        raise ImportError(
            "safecallbacks cannot recognise LangChain's streaming handlers: "
            "langchain_core.tracers._streaming._StreamingCallbackHandler is missing in "
            f"langchain-core {langchain_core.__version__}; please report this"
        )
    return found


STREAMING_HANDLER_BASE: Any = _required_streaming_base()
"""langchain-core's mark of handlers that feed astream_events/astream_log/LangGraph streams."""

V2_STREAMING_BASE: Any = _streaming_name("_V2StreamingCallbackHandler")
"""langchain-core >= 1.x: handlers that want on_stream_event (None on 0.3)."""

_async_event_runner = getattr(_lc_manager, "_ahandle_event_for_handler", None)
ASYNC_MANAGER_CODE: CodeType | None = getattr(_async_event_runner, "__code__", None)
"""The code of the function through which LangChain's async managers call a handler."""

COROUTINE_MARKER: Any = getattr(asyncio.coroutines, "_is_coroutine", None)
"""asyncio's marker that made a callable look like a coroutine function (older engines)."""


def _frame(depth: int) -> FrameType | None:
    try:
        return sys._getframe(depth + 1)
    except (AttributeError, ValueError):  # pragma: no cover - other interpreters
        return None


def called_by_async_manager(depth: int = 1) -> bool:
    """True when the function ``depth`` frames up is LangChain's async event runner.

    LangChain awaits a hook only on its async path; on the sync path (also when
    sync code runs inside an event loop) a returned coroutine would be run on a
    throwaway loop. Without frame access we fall back to "a loop is running here".
    """
    if ASYNC_MANAGER_CODE is None:
        return get_running_loop() is not None
    frame = _frame(depth + 1)
    if frame is None:  # pragma: no cover
        return get_running_loop() is not None
    return frame.f_code is ASYNC_MANAGER_CODE


def constructing_self(depth: int = 1) -> object | None:
    """The ``self`` of the method ``depth`` frames up, if it is one (else None).

    Used once per construction of a hardened handler, to find the handler that
    made it (``self.__class__(...)`` in ``copy_with_metadata_defaults``).
    """
    frame = _frame(depth + 1)
    if frame is None or frame.f_code.co_varnames[:1] != ("self",):
        return None
    return frame.f_locals.get("self")


def copying_self(depth: int = 1) -> object | None:
    """``constructing_self``, only when that method's name says it copies (else None).

    ``copy_with_metadata_defaults``, ``copy``, ``__copy__``, ``__deepcopy__``,
    ``model_copy``: what they build is the maker again. A per-request factory
    (``type(self)()`` in ``for_request``) builds a handler of its own.
    """
    frame = _frame(depth + 1)
    if frame is None or "copy" not in frame.f_code.co_name:
        return None
    return constructing_self(depth + 1)


def configure_function() -> Any:
    """langchain-core's ``_configure``: every callback manager a run uses is built by it.

    ``install()`` hardens what it returns. Missing, ``install()`` fails loudly
    rather than silently hardening nothing.
    """
    found = getattr(_lc_manager, "_configure", None)
    if found is None or not callable(found):
        import langchain_core

        raise RuntimeError(
            "safecallbacks.install() relies on langchain_core.callbacks.manager._configure, "
            f"which langchain-core {langchain_core.__version__} does not have; harden "
            "handlers with harden()/harden_config() instead and report this"
        )
    return found


def set_configure_function(function: Any) -> None:
    _lc_manager._configure = function


# --- counters and OpenTelemetry -------------------------------------------------


def count_value(counter: itertools.count[int]) -> int:
    """How many values ``counter`` has handed out, without consuming one.

    ``next()`` on an ``itertools.count`` is atomic under the GIL, the cheapest
    exact counter for many emitting threads; its repr is the only way to read it.
    """
    return int(repr(counter)[len("count(") : -1])


def _proxy_meter_provider() -> type | None:
    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - moved in a newer opentelemetry-api
        return None
    found: type = _ProxyMeterProvider
    return found


_PLACEHOLDER_PROVIDERS: tuple[type, ...] = tuple(
    cls for cls in (metrics.NoOpMeterProvider, _proxy_meter_provider()) if cls is not None
)


def sdk_configured() -> bool:
    """True once the application installed a real OpenTelemetry meter provider.

    Without the private proxy class we cannot tell "no SDK yet" from "an SDK",
    so we assume one: histograms are then recorded, never lost.
    """
    return not isinstance(metrics.get_meter_provider(), _PLACEHOLDER_PROVIDERS)


def reinit_lock_after_fork(lock: Any) -> None:
    """Make a lock usable again in a forked child, whoever held it in the parent.

    CPython's own modules do this with ``_at_fork_reinit`` (3.9+), which keeps
    the lock object, so every module that imported it by name sees the fresh one.
    """
    lock._at_fork_reinit()


_L = TypeVar("_L")


def fork_safe(lock: _L) -> _L:
    """Return ``lock``, re-initialised in every forked child (for module-level locks).

    A fork while another thread holds a lock would leave it held forever in the child.
    """
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: reinit_lock_after_fork(lock))
    return lock
