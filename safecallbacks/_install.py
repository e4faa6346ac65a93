"""``install()`` / ``uninstall()``: harden every handler that reaches a LangChain callback manager.

Every manager a run uses is built by langchain-core's ``_configure`` (config
callbacks, the tracer ``LANGSMITH_TRACING`` adds, configure hooks such as
``get_usage_metadata_callback``, tracers instrumentors inject while the
manager is built); handlers added later go through ``add_handler``. Both are
patched to harden each handler in place once, by the same per-kind policy and
plumbing rule as ``harden_config``. Hardening in place keeps LangChain's own
de-duplication (by ``isinstance`` and by identity) working, so nothing is
added twice. Nothing here runs on the token path: only when managers are built.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager

from . import _compat
from ._classes import harden_in_place
from ._compat import fork_safe
from ._hardened import _Hardened, engine_of
from ._options import Options, OptionValues, make_options, with_option_signature
from ._policy import dotted_name, is_plumbing

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass
class _Installed:
    """What ``install()`` set up: the options in force and what it patched (to restore)."""

    options: Options
    overrides: dict[str, Options]
    configure: Any
    add_handler: Any
    patched_configure: Any = None
    patched_add_handler: Any = None
    hardened: weakref.WeakSet[BaseCallbackHandler] = field(default_factory=weakref.WeakSet)

    def options_for(self, cls: type) -> Options:
        for klass in cls.__mro__:
            found = self.overrides.get(dotted_name(klass))
            if found is not None:
                return found
        return self.options


_lock = fork_safe(threading.RLock())
_installed: _Installed | None = None


def _harden(handler: Any) -> None:
    state = _installed
    if state is None or not isinstance(handler, BaseCallbackHandler):
        return
    if isinstance(handler, _Hardened) or is_plumbing(type(handler)):
        return
    with _lock:
        if isinstance(handler, _Hardened):
            return
        harden_in_place(handler, state.options_for(type(handler)))
        state.hardened.add(handler)


def _harden_manager(manager: Any) -> None:
    for handler in [
        *getattr(manager, "handlers", ()),
        *getattr(manager, "inheritable_handlers", ()),
    ]:
        _harden(handler)


def _harden_callbacks(callbacks: Any) -> None:
    """Harden what a ``callbacks`` argument of ``_configure`` holds: a list or a manager."""
    if isinstance(callbacks, BaseCallbackManager):
        _harden_manager(callbacks)
    elif isinstance(callbacks, (list, tuple)):
        for handler in callbacks:
            _harden(handler)


_CALLBACK_ARGUMENTS = ("inheritable_callbacks", "local_callbacks")


def _callback_positions(configure: Any) -> dict[str, int]:
    """Where ``_configure`` takes its handler arguments positionally (by name otherwise)."""
    try:
        parameters = list(inspect.signature(configure).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - a C or odd callable
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {
        parameter.name: index
        for index, parameter in enumerate(parameters)
        if parameter.name in _CALLBACK_ARGUMENTS and parameter.kind in positional
    }


def _overrides(
    given: Mapping[Any, Mapping[str, Any]] | None, base: dict[str, Any]
) -> dict[str, Options]:
    found: dict[str, Options] = {}
    for key, per_class in (given or {}).items():
        if isinstance(key, type):
            name = dotted_name(key)
        elif isinstance(key, str) and key.strip():
            name = key.strip()
        else:
            raise TypeError(
                f"install(overrides=...): keys must be handler classes or dotted class names, "
                f"got {key!r}"
            )
        if not isinstance(per_class, Mapping):
            raise TypeError(
                f"install(overrides=...): the options for {name} must be a dict, got {per_class!r}"
            )
        found[name] = make_options(**{**base, **per_class})
    return found


def install(
    *, overrides: Mapping[Any, Mapping[str, Any]] | None = None, **options: Unpack[OptionValues]
) -> None:
    """Harden every handler that reaches a LangChain callback manager, from anywhere.

    One call at start-up. ``options`` apply to every handler (with ``mode="auto"``
    choosing inline or offload per kind); ``overrides`` maps a handler class
    (or its dotted name) to options for it and its subclasses, e.g.
    ``install(overrides={LangChainTracer: {"mode": "offload"}})``. Calling it
    again replaces the options for handlers met from then on. Idempotent.
    """
    global _installed
    resolved = make_options(**options)
    per_class = _overrides(overrides, dict(options))
    with _lock:
        if _installed is not None:
            _installed.options, _installed.overrides = resolved, per_class
            return
        configure = _compat.configure_function()
        add_handler = BaseCallbackManager.add_handler
        state = _Installed(resolved, per_class, configure, add_handler)
        state.patched_configure = _hardening_configure(configure)
        state.patched_add_handler = _hardening_add_handler(add_handler)
        _installed = state
        _compat.set_configure_function(state.patched_configure)
        BaseCallbackManager.add_handler = state.patched_add_handler  # type: ignore[method-assign]


def _hardening_configure(configure: Any) -> Any:
    positions = _callback_positions(configure)

    @functools.wraps(configure)
    def configure_and_harden(*args: Any, **kwargs: Any) -> Any:
        if _installed is not None:
            # The handlers given are hardened before ``_configure`` sees them: it may
            # replace them by copies (``LangChainTracer.copy_with_metadata_defaults``),
            # which then join the family of the handler the caller holds.
            for name in _CALLBACK_ARGUMENTS:
                index = positions.get(name)
                if name in kwargs:
                    _harden_callbacks(kwargs[name])
                elif index is not None and index < len(args):
                    _harden_callbacks(args[index])
        manager = configure(*args, **kwargs)
        if _installed is not None:
            _harden_manager(manager)
        return manager

    configure_and_harden._sc_patch = True  # type: ignore[attr-defined]
    return configure_and_harden


def _hardening_add_handler(add_handler: Any) -> Any:
    @functools.wraps(add_handler)
    def add_handler_hardened(self: Any, handler: Any, inherit: bool = True) -> None:
        if _installed is not None:
            _harden(handler)
        add_handler(self, handler, inherit)

    add_handler_hardened._sc_patch = True  # type: ignore[attr-defined]
    return add_handler_hardened


with_option_signature(install)


def uninstall(timeout: float = 5.0) -> None:
    """Undo ``install()``: stop hardening, and give the handlers it hardened back their class.

    Their pending events are flushed first (up to ``timeout`` seconds in all).
    Handlers hardened explicitly (``harden``, ``harden_config``, ``SafeHandler``)
    stay hardened.
    """
    global _installed
    with _lock:
        state, _installed = _installed, None
        if state is None:
            return
        # Put back only what is still ours: a patch another library made on top of
        # ours (functools.wraps copies our marker onto it) stays, with ours inert
        # inside it (it hardens nothing while not installed).
        if _compat.configure_function() is state.patched_configure:
            _compat.set_configure_function(state.configure)
        if BaseCallbackManager.__dict__.get("add_handler") is state.patched_add_handler:
            BaseCallbackManager.add_handler = state.add_handler  # type: ignore[method-assign]
        handlers = list(state.hardened)
    for handler in handlers:
        _restore(handler, timeout)


def _restore(handler: Any, timeout: float) -> None:
    original = getattr(type(handler), "_sc_wrapped_class", None)
    if original is None:
        return
    if _compat.get_running_loop() is None:
        engine_of(handler).flush(timeout)  # best effort: what is still pending is delivered
        # by the engine anyway, which calls the handler's own hooks, not its class's
    try:
        handler.__class__ = original
    except TypeError:  # pragma: no cover - same layout by construction
        return
    handler.__dict__.pop("_sc_engine", None)


def installed() -> bool:
    """Whether ``install()`` is in effect."""
    return _installed is not None
