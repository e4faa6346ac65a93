"""The three ways in: ``SafeHandler`` subclasses, ``harden`` and ``harden_config``.

Whichever way a handler is hardened, LangChain ends up calling a *recorder*
in place of each hook the handler implements: a sync method that hands the
event to the handler's ``Dispatcher`` and returns. The handler's own hook
bodies are kept aside and only ever called by the dispatcher.
"""

from __future__ import annotations

import contextvars
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar, cast, overload

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager

from ._dispatch import Dispatcher
from ._hooks import HOOKS, IGNORE_FLAGS, implemented_hooks, is_async_callable, is_default_hook
from ._isolation import read_flag
from ._options import _UNSET, Options, make_options
from ._stats import Stats

try:  # langchain-core >= 1.x marks handlers that want on_stream_event
    from langchain_core.tracers._streaming import _V2StreamingCallbackHandler
except ImportError:  # pragma: no cover - langchain-core 0.3
    _V2StreamingCallbackHandler = None  # type: ignore[assignment,misc]

try:
    from langchain_core.tracers._streaming import _StreamingCallbackHandler
except ImportError:  # pragma: no cover
    _StreamingCallbackHandler = None  # type: ignore[assignment,misc]

H = TypeVar("H", bound=BaseCallbackHandler)
C = TypeVar("C", bound=type[BaseCallbackHandler])

_CORE_LOCK = threading.Lock()


class _Hardened:
    """What every hardened handler offers on top of the LangChain hooks."""

    _sc_core: Dispatcher

    # LangChain re-raises a handler's exceptions when raise_error is set; a
    # hardened handler never has it set, whatever the wrapped class says.
    @property
    def raise_error(self) -> bool:
        return False

    @raise_error.setter
    def raise_error(self, value: bool) -> None:
        pass  # accepted for compatibility with handlers that assign it, then ignored

    # Inline means LangChain's async path calls the recorder directly instead
    # of hopping to an executor thread per event.
    @property
    def run_inline(self) -> bool:
        return True

    @run_inline.setter
    def run_inline(self, value: bool) -> None:
        pass

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event emitted before this call was delivered, failed or dropped.

        Returns False if that did not happen within ``timeout`` seconds. Called
        from inside a running event loop it cannot wait for that loop's own
        deliveries; use ``aflush`` there.
        """
        return self._sc_core.flush(timeout)

    async def aflush(self, timeout: float = 5.0) -> bool:
        """``flush`` for async code: waits without blocking the event loop."""
        return await self._sc_core.aflush(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, then stop: events emitted afterwards are counted as dropped."""
        return self._sc_core.close(timeout)

    async def aclose(self, timeout: float = 5.0) -> bool:
        """``close`` for async code."""
        return await self._sc_core.aclose(timeout)

    def stats(self) -> Stats:
        """A frozen snapshot of this handler's counts, timings and state."""
        return self._sc_core.stats()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_T = TypeVar("_T", bound=_Hardened)


def _recorder(hook: str, original: Any = None) -> Callable[..., Any]:
    """The method LangChain calls in place of ``hook``: record the event and return.

    The common case (offload mode, sync handler, room in the queue) is inlined
    here: a few attribute reads, one append, no call into the dispatcher.
    With ``original`` it stands in a class body in place of that function.
    """
    owner: list[type] = []
    copy_context, now = contextvars.copy_context, time.monotonic

    def recorder(self: _Hardened, *args: Any, **kwargs: Any) -> Any:
        if original is not None:
            cls = type(self)
            if cls is not owner[0] and getattr(cls, hook) is not recorder:
                # Reached through super() from a subclass's own hook body, which is
                # being delivered right now: run the original, do not record again.
                return original.__get__(self, cls)(*args, **kwargs)
        core = self._sc_core
        lane = core.fast_lane
        if lane is None:
            core.record(hook, args, kwargs)
            return None
        next(lane.emitted)
        item = (hook, args, kwargs, copy_context(), now(), None)
        if len(lane.queue) >= lane.max_queue:
            lane.overflow(item)
            return None
        lane.queue.append(item)
        if not lane.scheduled:
            lane.kick()
        return None

    recorder.__name__ = recorder.__qualname__ = hook
    if original is not None:
        recorder.__doc__ = getattr(original, "__doc__", None)
        recorder._sc_owner = owner  # type: ignore[attr-defined]
    return recorder


def _isolated_flag(flag: str, original: Any) -> property:
    """An ``ignore_*`` property that can never raise into LangChain."""

    def safe(self: object) -> bool:
        try:
            value = original.__get__(self, type(self)) if hasattr(original, "__get__") else original
            return bool(value)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            _flag_failed(self, flag, exc)
            return False

    return property(safe, doc=f"{flag}, read from the handler's own definition, never raising.")


def _flag_failed(handler: object, flag: str, exc: BaseException) -> None:
    core = getattr(handler, "_sc_core", None)
    if isinstance(core, Dispatcher):
        core.observer.announce_once(
            f"flag:{flag}", "ignore_flag_failed", flag=flag, error_type=type(exc).__qualname__
        )


def _resolved_originals(cls: type) -> dict[str, Any]:
    originals: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        originals.update(klass.__dict__.get("_sc_originals", {}))
    return originals


def _make_class_resolver(handler: Any) -> Callable[[str], Callable[..., Any]]:
    cls = type(handler)
    originals: Mapping[str, Any] = cls._sc_resolved

    def resolve(hook: str) -> Callable[..., Any]:
        original = originals.get(hook)
        if original is None:
            return cast(Callable[..., Any], getattr(handler, hook))
        return cast(Callable[..., Any], original.__get__(handler, cls))

    return resolve


def _kind(hooks: Mapping[str, Any]) -> tuple[bool, bool]:
    """(every implemented hook is async, some implemented hook is async)."""
    flags = [is_async_callable(value) for value in hooks.values()]
    return bool(flags) and all(flags), any(flags)


def _class_core(handler: Any, options: Options) -> Dispatcher:
    cls = type(handler)
    async_only, has_async = _kind(cls._sc_resolved)
    return Dispatcher(
        target=handler,
        resolve=_make_class_resolver(handler),
        name=options.name or cls.__name__,
        options=options,
        async_only=async_only,
        has_async=has_async,
    )


def _install_inline_async_hooks(handler: Any, core: Dispatcher, hooks: Mapping[str, Any]) -> None:
    """In inline mode, async hooks are awaited by LangChain's async path (see InlineAsyncHook)."""
    if core.options.mode != "inline":
        return
    for hook, value in hooks.items():
        if is_async_callable(value):
            handler.__dict__[hook] = core.inline_async_hook(hook)


def _lazy_core(handler: Any) -> Dispatcher:
    with _CORE_LOCK:
        found = handler.__dict__.get("_sc_core")
        if found is None:
            found = _class_core(handler, type(handler)._sc_default_options)
            handler.__dict__["_sc_core"] = found
            _install_inline_async_hooks(handler, found, type(handler)._sc_resolved)
        return cast(Dispatcher, found)


def _harden_class_body(cls: type) -> None:
    """Replace the hooks and ignore flags defined in ``cls``'s own body."""
    originals: dict[str, Any] = {}
    for hook in HOOKS:
        value = cls.__dict__.get(hook)
        if value is None or is_default_hook(value) or getattr(value, "_sc_owner", None):
            continue
        originals[hook] = value
        recorder = _recorder(hook, value)
        recorder._sc_owner.append(cls)  # type: ignore[attr-defined]
        setattr(cls, hook, recorder)
    for attr in ("raise_error", "run_inline"):
        if attr in cls.__dict__:  # a hardened class never re-raises and never hops threads
            setattr(cls, attr, _Hardened.__dict__[attr])
    cls._sc_originals = originals  # type: ignore[attr-defined]
    cls._sc_resolved = _resolved_originals(cls)  # type: ignore[attr-defined]
    for flag in IGNORE_FLAGS:
        value = cls.__dict__.get(flag)
        if value is not None and not getattr(value, "_sc_flag", False):
            guarded = _isolated_flag(flag, value)
            setattr(cls, flag, guarded)
            guarded.fget._sc_flag = True  # type: ignore[union-attr]


class _HardenedClassBase(_Hardened):
    """Hooks defined in a subclass body are hardened; the dispatcher is made on first use.

    Shared by ``SafeHandler`` and by the classes ``harden`` makes from a handler class.
    """

    _sc_default_options: Options = make_options()
    _sc_resolved: Mapping[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _harden_class_body(cls)

    def __getattr__(self, name: str) -> Any:
        if name == "_sc_core":
            return _lazy_core(self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class SafeHandler(_HardenedClassBase, BaseCallbackHandler):
    """Subclass this instead of ``BaseCallbackHandler``: every hook you define is hardened.

    Hooks may be sync or ``async def``. Options are the keyword arguments of
    ``__init__``; a subclass that defines its own ``__init__`` and never calls
    ``super().__init__()`` still works, with the default options.
    """

    def __init__(
        self,
        *,
        mode: Any = _UNSET,
        max_queue: Any = _UNSET,
        on_full: Any = _UNSET,
        block_timeout: Any = _UNSET,
        timeout: Any = _UNSET,
        breaker: Any = _UNSET,
        name: Any = _UNSET,
        log_payloads: Any = _UNSET,
        summary_interval: Any = _UNSET,
        stall_threshold: Any = _UNSET,
        exit_timeout: Any = _UNSET,
    ) -> None:
        options = make_options(
            mode=mode,
            max_queue=max_queue,
            on_full=on_full,
            block_timeout=block_timeout,
            timeout=timeout,
            breaker=breaker,
            name=name,
            log_payloads=log_payloads,
            summary_interval=summary_interval,
            stall_threshold=stall_threshold,
            exit_timeout=exit_timeout,
        )
        with _CORE_LOCK:
            previous = self.__dict__.get("_sc_core")
            core = self.__dict__["_sc_core"] = _class_core(self, options)
        _install_inline_async_hooks(self, core, type(self)._sc_resolved)
        if previous is not None:
            previous.close(0.0)


# --- harden(instance) ---------------------------------------------------------


class _HardenedProxy(_Hardened, BaseCallbackHandler):
    """A hardened stand-in for an existing handler instance."""

    _sc_wrapped: BaseCallbackHandler

    def __init__(self, wrapped: BaseCallbackHandler, options: Options) -> None:
        hooks = implemented_hooks(wrapped)
        async_only, has_async = _kind(hooks)
        self._sc_wrapped = wrapped
        self._sc_core = Dispatcher(
            target=wrapped,
            resolve=lambda hook: cast(Callable[..., Any], getattr(wrapped, hook)),
            name=options.name or type(wrapped).__name__,
            options=options,
            async_only=async_only,
            has_async=has_async,
        )
        _install_inline_async_hooks(self, self._sc_core, hooks)

    @property
    def wrapped(self) -> BaseCallbackHandler:
        """The handler this one delivers to."""
        return self._sc_wrapped

    def __repr__(self) -> str:
        return f"harden({self._sc_wrapped!r}, mode={self._sc_core.options.mode!r})"


def _read_through(flag: str) -> property:
    def read(self: _HardenedProxy) -> bool:
        value, error = read_flag(self._sc_wrapped, flag)
        if error is not None:
            _flag_failed(self, flag, error)
        return value

    return property(read, doc=f"The wrapped handler's {flag}, read live; False if it raises.")


_BASE_FLAGS = {flag: BaseCallbackHandler.__dict__[flag] for flag in IGNORE_FLAGS}
_proxy_classes: dict[tuple[Any, ...], type[_HardenedProxy]] = {}
_proxy_classes_lock = threading.Lock()


def _proxy_class(wrapped: BaseCallbackHandler) -> type[_HardenedProxy]:
    hooks = tuple(sorted(implemented_hooks(wrapped)))
    live_flags = tuple(
        flag
        for flag in IGNORE_FLAGS
        if inspect.getattr_static(wrapped, flag, None) is not _BASE_FLAGS[flag]
    )
    v2 = _V2StreamingCallbackHandler is not None and isinstance(
        wrapped, _V2StreamingCallbackHandler
    )
    key = (hooks, live_flags, v2)
    with _proxy_classes_lock:
        found = _proxy_classes.get(key)
        if found is None:
            namespace: dict[str, Any] = {hook: _recorder(hook) for hook in hooks}
            for flag in IGNORE_FLAGS:
                namespace[flag] = _read_through(flag) if flag in live_flags else False
            bases: tuple[type, ...] = (_HardenedProxy,)
            if v2:
                bases = (_HardenedProxy, _V2StreamingCallbackHandler)
            found = cast(type[_HardenedProxy], type("HardenedHandler", bases, namespace))
            _proxy_classes[key] = found
        return found


_instances: weakref.WeakValueDictionary[tuple[int, Options], _HardenedProxy] = (
    weakref.WeakValueDictionary()
)
_instances_lock = threading.Lock()


def _harden_instance(handler: BaseCallbackHandler, options: Options) -> BaseCallbackHandler:
    if isinstance(handler, _Hardened):
        return handler
    if _StreamingCallbackHandler is not None and isinstance(handler, _StreamingCallbackHandler):
        raise TypeError(
            f"{type(handler).__name__} is part of LangChain's streaming machinery "
            "(astream_events, astream_log, LangGraph) and must run inline; it cannot be hardened"
        )
    key = (id(handler), options)
    with _instances_lock:
        found = _instances.get(key)
        if found is not None and found._sc_wrapped is handler and not found._sc_core.closed:
            return found
        made = _proxy_class(handler)(handler, options)
        _instances[key] = made
        return made


# --- harden(cls) --------------------------------------------------------------


def _harden_class(cls: C, options: Options) -> C:
    if issubclass(cls, _Hardened):
        return cls
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_sc_default_options": options,
        "_sc_wrapped_class": cls,
    }
    for hook, value in implemented_hooks(cls).items():
        namespace[hook] = value  # re-stated here so the body hardening picks it up
    for flag in IGNORE_FLAGS:
        value = inspect.getattr_static(cls, flag, None)
        if value is not None and value is not _BASE_FLAGS[flag]:
            namespace[flag] = value
    hardened = type(cls.__name__, (_HardenedClassBase, cls), namespace)
    return cast(C, hardened)


# --- the public entry points ----------------------------------------------------


@overload
def harden(target: C, /) -> C: ...
@overload
def harden(target: H, /) -> H: ...
@overload
def harden(
    target: None = None,
    /,
    *,
    mode: Any = ...,
    max_queue: Any = ...,
    on_full: Any = ...,
    block_timeout: Any = ...,
    timeout: Any = ...,
    breaker: Any = ...,
    name: Any = ...,
    log_payloads: Any = ...,
    summary_interval: Any = ...,
    stall_threshold: Any = ...,
    exit_timeout: Any = ...,
) -> Callable[[Any], Any]: ...
@overload
def harden(target: Any, /, **options: Any) -> Any: ...


def harden(target: Any = None, /, **options: Any) -> Any:
    """Harden a handler instance or class; with only options, return a decorator.

    ``harden(handler)`` returns a hardened stand-in that delivers to
    ``handler`` (the same stand-in each time for the same handler and options).
    ``@harden`` or ``@harden(max_queue=...)`` on a handler class makes every
    instance hardened. Something already hardened is returned as it is.
    """
    resolved = make_options(**options)
    if target is None:
        return lambda inner: _harden_one(inner, resolved)
    return _harden_one(target, resolved)


def _harden_one(target: Any, options: Options) -> Any:
    if isinstance(target, type):
        if issubclass(target, BaseCallbackHandler):
            return _harden_class(target, options)
        raise TypeError(
            f"harden() expects a LangChain callback handler or handler class "
            f"(a BaseCallbackHandler), got the class {target.__qualname__}"
        )
    if isinstance(target, BaseCallbackHandler):
        return _harden_instance(target, options)
    raise TypeError(
        f"harden() expects a LangChain callback handler or handler class "
        f"(a BaseCallbackHandler), got {type(target).__qualname__}: {target!r:.80}"
    )


def _leave_alone(handler: BaseCallbackHandler) -> bool:
    """Handlers that are LangChain's own plumbing keep running exactly as they do."""
    if isinstance(handler, _Hardened):
        return True
    return _StreamingCallbackHandler is not None and isinstance(handler, _StreamingCallbackHandler)


def harden_config(config: Mapping[str, Any] | None = None, /, **options: Any) -> dict[str, Any]:
    """Return a copy of a ``RunnableConfig`` with every callback handler hardened.

    ``callbacks`` may be a list of handlers or a callback manager; a manager
    keeps which handlers are inheritable and which are local. Idempotent:
    hardened handlers, and LangChain's own streaming plumbing
    (``astream_events``, ``astream_log``, LangGraph), are left as they are.
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
    memo: dict[int, BaseCallbackHandler] = {}

    def one(handler: Any) -> BaseCallbackHandler:
        if not isinstance(handler, BaseCallbackHandler):
            raise TypeError(
                "harden_config(): every entry of config['callbacks'] must be a "
                f"BaseCallbackHandler, got {type(handler).__qualname__}"
            )
        if _leave_alone(handler):
            return handler
        if id(handler) not in memo:
            memo[id(handler)] = _harden_instance(handler, resolved)
        return memo[id(handler)]

    if isinstance(callbacks, (list, tuple)):
        result["callbacks"] = [one(h) for h in callbacks]
    elif isinstance(callbacks, BaseCallbackManager):
        manager = callbacks.copy()
        manager.handlers = [one(h) for h in callbacks.handlers]
        manager.inheritable_handlers = [one(h) for h in callbacks.inheritable_handlers]
        result["callbacks"] = manager
    else:
        raise TypeError(
            "harden_config(): config['callbacks'] must be a list of handlers or a "
            f"callback manager, got {type(callbacks).__qualname__}"
        )
    return result
