"""The ways in: ``SafeHandler``, ``harden``, ``harden_config`` and the module-level controls.

Whichever way a handler is hardened, it stays itself: ``harden(h)`` returns
``h``, now an instance of a hardened subclass of its own class. Nothing here
runs on the token path.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager

from ._classes import _HardenedClassBase, harden_in_place, hardened_class
from ._dispatch import Engine
from ._hardened import ENGINE_LOCK, _Hardened, engine_of, make_engine
from ._hooks import hooks_on_instance, instance_hooks_error
from ._options import Options, OptionValues, make_options, with_option_signature
from ._policy import dotted_name, is_plumbing
from ._stats import Stats

if TYPE_CHECKING:
    from typing_extensions import Unpack

H = TypeVar("H", bound=BaseCallbackHandler)
C = TypeVar("C", bound=type[BaseCallbackHandler])


class SafeHandler(_HardenedClassBase, BaseCallbackHandler):
    """Subclass this instead of ``BaseCallbackHandler``: every hook you define is hardened.

    Hooks may be sync or ``async def``. Mixed with an existing handler class
    (``class X(SafeHandler, StdOutCallbackHandler)``) the hooks it inherits are
    hardened too. Options are the keyword arguments of ``__init__``; a subclass
    that never calls ``super().__init__()`` still works, with the default options.
    """

    def __init__(self, **options: Unpack[OptionValues]) -> None:
        resolved = make_options(**options)
        with ENGINE_LOCK:
            previous = self.__dict__.get("_sc_engine")
            self.__dict__["_sc_engine"] = make_engine(self, resolved)
        if isinstance(previous, Engine) and previous.target is self:
            previous.shut("closed")


# --- the public entry points ----------------------------------------------------


class _NoTarget(enum.Enum):
    """``harden(**options)`` was called without a handler: it returns a decorator."""

    TOKEN = 0

    def __repr__(self) -> str:
        return "<none: returns a decorator>"


@overload
def harden(target: C, /, **options: Unpack[OptionValues]) -> C: ...
@overload
def harden(target: H, /, **options: Unpack[OptionValues]) -> H: ...
@overload
def harden(**options: Unpack[OptionValues]) -> Callable[[C], C]: ...


def harden(target: Any = _NoTarget.TOKEN, /, **options: Any) -> Any:
    """Harden a handler instance or class; with only options, return a decorator.

    ``harden(handler)`` hardens ``handler`` itself and returns it: it is still
    an instance of its class, with its own state and methods, only its hooks
    can no longer break, stall or tax a stream. ``@harden`` or
    ``@harden(max_queue=...)`` on a handler class makes every instance
    hardened. Something already hardened is returned as it is; asking for
    other options than it has raises ``ValueError``. A hardened handler pickles
    and arrives hardened, with its options and an engine of its own: queues,
    workers and counts stay in the process that pickled it.
    """
    resolved = make_options(**options)
    if target is _NoTarget.TOKEN:
        return lambda inner: _harden_one(inner, resolved, bool(options))
    return _harden_one(target, resolved, bool(options))


def _not_a_handler(target: Any) -> TypeError:
    what = (
        f"the class {target.__qualname__}"
        if isinstance(target, type)
        else (f"{type(target).__qualname__}: {target!r:.80}")
    )
    return TypeError(
        "harden() expects a LangChain callback handler or handler class "
        f"(a BaseCallbackHandler), got {what}"
    )


def _harden_one(target: Any, options: Options, explicit: bool) -> Any:
    if isinstance(target, type):
        if not issubclass(target, BaseCallbackHandler):
            raise _not_a_handler(target)
        if issubclass(target, _Hardened):
            return target
        _refuse_plumbing(target)
        return hardened_class(target, options)
    if not isinstance(target, BaseCallbackHandler):
        raise _not_a_handler(target)
    if isinstance(target, _Hardened):
        found = hooks_on_instance(target)
        if found:  # a hardened class's instance set it in __init__: say so, as for the rest
            raise instance_hooks_error(target, found)
        current = engine_of(target)
        if explicit and current.requested != options:
            raise ValueError(
                f"{type(target).__qualname__} is already hardened with other options "
                f"({_differences(current.requested, options)}); a handler has one set of options"
            )
        if current.closed:  # hardening a closed handler again reopens it
            with ENGINE_LOCK:
                target.__dict__["_sc_engine"] = make_engine(target, current.requested)
        return target
    _refuse_plumbing(type(target))
    harden_in_place(target, options)
    return target


def _differences(current: Options, wanted: Options) -> str:
    names = [
        name
        for name in current.__dataclass_fields__
        if getattr(current, name) != getattr(wanted, name)
    ]
    return ", ".join(f"{n}={getattr(current, n)!r}, not {getattr(wanted, n)!r}" for n in names)


def _refuse_plumbing(cls: type) -> None:
    if is_plumbing(cls):
        raise TypeError(
            f"{dotted_name(cls)} is part of LangChain's or LangGraph's own machinery "
            "(astream_events, astream_log, stream modes, timeouts) and must run exactly "
            "as it does; it cannot be hardened"
        )


def harden_handler(handler: BaseCallbackHandler, options: Options) -> BaseCallbackHandler:
    """Harden one handler met in a config or a manager: plumbing and hardened ones stay."""
    if isinstance(handler, _Hardened) or is_plumbing(type(handler)):
        return handler
    harden_in_place(handler, options)
    return handler


def harden_config(
    config: Mapping[str, Any] | None = None, /, **options: Unpack[OptionValues]
) -> dict[str, Any]:
    """Return a copy of a ``RunnableConfig`` whose callback handlers are all hardened.

    ``callbacks`` may be a list of handlers or a callback manager; a manager
    keeps which handlers are inheritable and which are local. Idempotent:
    hardened handlers, and LangChain's own plumbing (``astream_events``,
    ``astream_log``, LangGraph's stream and timeout handlers), are left as they are.
    """
    resolved = make_options(**options)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"harden_config() expects a RunnableConfig (a dict), got {type(config).__qualname__}"
        )
    result = dict(config)
    callbacks = config.get("callbacks")
    if callbacks is None:
        return result

    def one(handler: Any) -> BaseCallbackHandler:
        if not isinstance(handler, BaseCallbackHandler):
            raise TypeError(
                "harden_config(): every entry of config['callbacks'] must be a "
                f"BaseCallbackHandler, got {type(handler).__qualname__}"
            )
        return harden_handler(handler, resolved)

    if isinstance(callbacks, (list, tuple)):
        result["callbacks"] = [one(h) for h in callbacks]
    elif isinstance(callbacks, BaseCallbackManager):
        manager = callbacks.copy()  # the caller's manager is left as it was, bar hardening
        manager.handlers = [one(h) for h in callbacks.handlers]
        manager.inheritable_handlers = [one(h) for h in callbacks.inheritable_handlers]
        result["callbacks"] = manager
    else:
        raise TypeError(
            "harden_config(): config['callbacks'] must be a list of handlers or a "
            f"callback manager, got {type(callbacks).__qualname__}"
        )
    return result


# --- controls that always work ------------------------------------------------------


def _engine_for(handler: Any, function: str) -> Engine:
    if not isinstance(handler, _Hardened):
        raise TypeError(
            f"safecallbacks.{function}() expects a hardened handler (from harden(), "
            f"SafeHandler, harden_config() or install()), got {type(handler).__qualname__}"
        )
    return engine_of(handler)


def flush(handler: BaseCallbackHandler, timeout: float = 5.0) -> bool:
    """Wait until every event ``handler`` was given before this call is settled.

    Works whatever methods the handler's own class defines (an exporter's own
    ``flush()`` wins over ours on the handler itself). False on timeout.
    """
    return _engine_for(handler, "flush").flush(timeout)


async def aflush(handler: BaseCallbackHandler, timeout: float = 5.0) -> bool:
    """``flush`` for async code: waits without blocking the event loop."""
    return await _engine_for(handler, "aflush").aflush(timeout)


def close(handler: BaseCallbackHandler, timeout: float = 5.0) -> bool:
    """Flush, then stop delivering to ``handler``: later events are counted as dropped."""
    return _engine_for(handler, "close").close(timeout)


async def aclose(handler: BaseCallbackHandler, timeout: float = 5.0) -> bool:
    """``close`` for async code."""
    return await _engine_for(handler, "aclose").aclose(timeout)


def stats(handler: BaseCallbackHandler) -> Stats:
    """A frozen snapshot of ``handler``'s counts, timings and state (copies included)."""
    return _engine_for(handler, "stats").stats()


# help() and IDEs show every option with its real default, taken from ``Options``.
with_option_signature(SafeHandler.__init__)
with_option_signature(harden)
with_option_signature(harden_config)
