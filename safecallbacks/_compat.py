"""Every private or version-specific API the package leans on, in one place.

Each name here either has a fallback that keeps the package correct (only
slower or less precise) or fails loudly where silence would change what a
handler does. ``tests/test_compat.py`` pins each one against the installed
versions, so an upgrade that moves a private name breaks a test, not a stream.
Nothing here runs on the token path except ``get_running_loop`` and
``called_by_async_manager``.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from types import CodeType, FrameType
from typing import Any

import langchain_core.callbacks.manager as _lc_manager

get_running_loop = asyncio._get_running_loop
"""The running loop of this thread or None, without raising (a C fast path)."""


def _streaming_name(name: str) -> Any:
    try:
        module = importlib.import_module("langchain_core.tracers._streaming")
    except ImportError:  # pragma: no cover - very old langchain-core
        return None
    return getattr(module, name, None)


STREAMING_HANDLER_BASE: Any = _streaming_name("_StreamingCallbackHandler")
"""langchain-core's mark of handlers that feed astream_events/astream_log/LangGraph streams."""

V2_STREAMING_BASE: Any = _streaming_name("_V2StreamingCallbackHandler")
"""langchain-core >= 1.x: handlers that want on_stream_event (None on 0.3)."""

_async_event_runner = getattr(_lc_manager, "_ahandle_event_for_handler", None)
ASYNC_MANAGER_CODE: CodeType | None = getattr(_async_event_runner, "__code__", None)
"""The code of the function through which LangChain's async managers call a handler."""

COROUTINE_MARKER: Any = getattr(asyncio.coroutines, "_is_coroutine", None)
"""asyncio's marker that made a callable look like a coroutine function (older cores)."""


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
