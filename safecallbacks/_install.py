"""``install()`` / ``uninstall()``: harden every handler that reaches a LangChain callback manager.

Every manager a run uses is built by langchain-core's ``_configure`` (config
callbacks, the tracer ``LANGSMITH_TRACING`` adds, configure hooks such as
``get_usage_metadata_callback``, tracers instrumentors inject while the
manager is built); handlers added later go through ``add_handler``. Both are
patched to harden each handler in place once, by the same per-kind policy and
plumbing rule as ``harden_config``. Hardening in place keeps LangChain's own
de-duplication (by ``isinstance`` and by identity) working, so nothing is
added twice. Nothing here runs on the token path: only when managers are built.

Nothing on these patched paths may raise into a run: a handler that cannot be
hardened (its class refuses subclasses, say) stays bare, is counted
(``not_hardened()``) and logged once per class. Handlers are tracked by
identity, never by hash: dataclass and pydantic handlers are unhashable.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager

from . import _compat, _logs
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
    hardened: dict[int, weakref.ref[BaseCallbackHandler]] = field(default_factory=dict)
    refused: dict[int, weakref.ref[Any]] = field(default_factory=dict)

    def track(self, handler: BaseCallbackHandler) -> None:
        """Remember ``handler`` for ``uninstall``, by identity (it may be unhashable)."""
        _remember(self.hardened, handler)

    def handlers(self) -> list[BaseCallbackHandler]:
        return [h for h in (ref() for ref in list(self.hardened.values())) if h is not None]

    def options_for(self, cls: type) -> Options:
        for klass in cls.__mro__:
            found = self.overrides.get(dotted_name(klass))
            if found is not None:
                return found
        return self.options


_lock = fork_safe(threading.RLock())
_installed: _Installed | None = None
_not_hardened = 0
_warned: set[str] = set()


def not_hardened() -> int:
    """How many handlers ``install()`` met but could not harden (they ran bare)."""
    return _not_hardened


def _remember(where: dict[int, weakref.ref[Any]], handler: Any) -> None:
    key = id(handler)

    def forget(ref: weakref.ref[Any]) -> None:
        if where.get(key) is ref:
            del where[key]

    where[key] = weakref.ref(handler, forget)


def _harden(handler: Any) -> None:
    state = _installed
    if state is None:
        return
    found = state.refused.get(id(handler))
    if found is not None and found() is handler:
        return  # met again (every manager of a run meets it): counted and logged once
    try:
        _harden_tracked(state, handler)
    except Exception as exc:  # never into the run: the handler stays bare
        _leave_bare(state, handler, exc)


def _harden_tracked(state: _Installed, handler: Any) -> None:
    if not isinstance(handler, BaseCallbackHandler):
        return
    if isinstance(handler, _Hardened) or is_plumbing(type(handler)):
        return
    with _lock:
        if isinstance(handler, _Hardened):
            return
        harden_in_place(handler, state.options_for(type(handler)))
        state.track(handler)  # untracked, uninstall could not give its class back


def _leave_bare(state: _Installed, handler: Any, exc: Exception) -> None:
    global _not_hardened
    with _lock:
        _give_class_back(handler)
        with contextlib.suppress(TypeError):  # not weakly referable: met as new each time
            _remember(state.refused, handler)
        _not_hardened += 1
        name = dotted_name(type(handler))
        first = name not in _warned
        _warned.add(name)
    if first:
        _logs.logger().warning(
            "install_could_not_harden",
            handler=name,
            error=f"{type(exc).__qualname__}: {exc}",
            consequence="this handler runs bare: its failures and stalls reach the run",
        )


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
        handlers = state.handlers()
    for handler in handlers:
        _restore(handler, timeout)


def _restore(handler: Any, timeout: float) -> None:
    if getattr(type(handler), "_sc_wrapped_class", None) is None:
        return
    if _compat.get_running_loop() is None:
        engine_of(handler).flush(timeout)  # best effort: what is still pending is delivered
        # by the engine anyway, which calls the handler's own hooks, not its class's
    _give_class_back(handler)


def _give_class_back(handler: Any) -> None:
    original = getattr(type(handler), "_sc_wrapped_class", None)
    if original is None:
        return
    try:  # past the class's own __setattr__ (a frozen dataclass refuses any assignment)
        object.__setattr__(handler, "__class__", original)
    except TypeError:  # pragma: no cover - same layout by construction
        return
    handler.__dict__.pop("_sc_engine", None)


def installed() -> bool:
    """Whether ``install()`` is in effect."""
    return _installed is not None
