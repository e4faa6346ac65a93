"""The hardened surface: what LangChain calls in place of a handler's hooks.

Hardening never wraps. A hardened handler's class is a generated subclass of
its own class (so ``isinstance`` holds, its state and its other methods are
its own) whose hooks are *recorders*: sync methods that hand the event to the
handler's engine (``Engine``) and return. The handler's own hook bodies
are kept aside and only ever called by the engine, or, for inline handlers,
by the recorder itself inside an isolating ``try``.

On the token path: the recorders (offload: append to the lane; inline: call
the hook, count it) and ``_HookAttribute.__get__`` for hooks LangChain's
async manager may have to await.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from contextvars import copy_context
from functools import partial
from operator import is_, is_not
from time import monotonic
from types import FunctionType, MethodType, TracebackType
from typing import Any, TypeVar, cast

from . import _compat
from ._compat import fork_safe
from ._dispatch import Engine, Unbound, refuse_in_a_loop
from ._hooks import END_HOOKS, START_HOOKS, class_hooks, is_async_callable
from ._inline import PLAIN_RESULTS
from ._options import Options
from ._policy import decide
from ._stats import Stats

ENGINE_LOCK = fork_safe(threading.RLock())
"""Held while a handler's engine is bound or replaced (rare: once per handler)."""
_getframe = sys._getframe
_get_running_loop = _compat.get_running_loop
_ASYNC_MANAGER_CODE = _compat.ASYNC_MANAGER_CODE
_PLAIN_RESULTS = PLAIN_RESULTS
_T = TypeVar("_T", bound="_Hardened")


class _Hardened:
    """What every hardened handler offers on top of the LangChain hooks.

    In a class made by ``harden`` these come last in the MRO: where the
    handler's own class has a method of the same name (an exporter's own
    ``flush()`` or ``close()``), the handler's wins, and the module-level
    ``safecallbacks.flush(h)`` etc. are the way to reach ours.
    """

    __slots__ = ()

    def _keep_run_inline(self, value: bool) -> None:
        # Kept as the bare handler's wish: it decides how LangChain would run its
        # hooks on the async path (in the caller's task, or in a task of their own).
        engine_of(self).bare_run_inline = bool(value)

    def _ignore_raise_error(self, value: bool) -> None:
        pass  # accepted for handlers that assign it in __init__, then ignored

    # LangChain reads both for every event and handler, so the getters are C callables
    # (``None is self`` is always False, ``None is not self`` always True), not Python
    # functions: no Python frame per read.
    raise_error = property(
        partial(is_, None),
        _ignore_raise_error,
        doc="Always False: LangChain must never re-raise a hardened handler's exception.",
    )
    run_inline = property(
        partial(is_not, None),
        _keep_run_inline,
        doc="Always True: LangChain calls the recorder in place, with no executor hop.",
    )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event emitted before this call was delivered, failed or dropped.

        Returns False if that did not happen within ``timeout`` seconds. Called
        from inside a running event loop it cannot wait for that loop's own
        deliveries; use ``aflush`` there.
        """
        return engine_of(self).flush(timeout)

    async def aflush(self, timeout: float = 5.0) -> bool:
        """``flush`` for async code: waits without blocking the event loop."""
        return await engine_of(self).aflush(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, then stop: events emitted afterwards are counted as dropped."""
        return engine_of(self).close(timeout)

    async def aclose(self, timeout: float = 5.0) -> bool:
        """``close`` for async code."""
        return await engine_of(self).aclose(timeout)

    def stats(self) -> Stats:
        """A frozen snapshot of this handler's counts, timings and state."""
        return engine_of(self).stats()

    def __enter__(self: _T) -> _T:
        # Refused before the block runs: its exit would have to block the running loop.
        refuse_in_a_loop("__exit__")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine_of(self).close(5.0, "__exit__")  # inside a running loop: an error, nothing dropped

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await engine_of(self).aclose(5.0)


# --- the handler's engine -------------------------------------------------------


def engine_of(handler: Any) -> Engine:
    """The engine of a hardened handler, made on first use (also for copies)."""
    found = handler.__dict__.get("_sc_engine")
    if isinstance(found, Engine) and found.target is handler:
        return found
    return _bind(handler)


def _bind(handler: Any) -> Engine:
    with ENGINE_LOCK:
        found = handler.__dict__.get("_sc_engine")
        if isinstance(found, Engine) and found.target is handler:
            return found
        cls = type(handler)
        if isinstance(found, Unbound):
            options, parent = found.options, found.parent
        elif isinstance(found, Engine):  # a shallow copy of a hardened handler
            options, parent = found.requested, found
        else:
            options, parent = cls._sc_default_options, None
        made = make_engine(handler, options, parent)
        handler.__dict__["_sc_engine"] = made
        return made


def make_engine(handler: Any, requested: Options, parent: Engine | None = None) -> Engine:
    cls = type(handler)
    resolved: Mapping[str, Any] = cls._sc_resolved
    if requested.mode == "auto":
        decision = decide(cls)
        mode, reason, adaptive = decision.mode, decision.reason, decision.adaptive
    else:
        mode, reason, adaptive = requested.mode, f"mode={requested.mode!r} given", False
    options = requested if mode == requested.mode else _with_mode(requested, mode)
    async_hooks = [hook for hook, value in resolved.items() if is_async_callable(value)]
    made = Engine(
        target=handler,
        resolve=_class_resolver(handler),
        name=requested.name or cls.__name__,
        options=options,
        async_only=bool(resolved) and len(async_hooks) == len(resolved),
        has_async=bool(async_hooks),
        hooks=(*class_hooks(cls), *resolved),
        async_hooks=async_hooks,
        requested=requested,
        parent=parent,
        reason=reason,
        adaptive=adaptive,
    )
    made.bare_run_inline = _bare_run_inline(handler)
    return made


def _bare_run_inline(handler: Any) -> bool:
    """The ``run_inline`` the handler would have bare (instance value first, as LangChain reads)."""
    if "run_inline" in handler.__dict__:
        return bool(handler.__dict__["run_inline"])
    ours = _Hardened.__dict__["run_inline"]
    for klass in type(handler).__mro__:
        value = vars(klass).get("run_inline", ours)
        if value is not ours:
            return value if isinstance(value, bool) else False
    return False


def _with_mode(options: Options, mode: str) -> Options:
    from dataclasses import replace

    return replace(options, mode=cast(Any, mode))


def _class_resolver(handler: Any) -> Callable[[str], Callable[..., Any]]:
    cls = type(handler)
    originals: Mapping[str, Any] = cls._sc_resolved

    def resolve(hook: str) -> Callable[..., Any]:
        original = originals.get(hook)
        if original is None:
            return cast("Callable[..., Any]", getattr(handler, hook))
        return cast("Callable[..., Any]", bound(original, handler, cls))

    return resolve


def bound(original: Any, handler: Any, cls: type) -> Any:
    """``original`` as ``getattr(handler, hook)`` gives it bare: bound if it is a descriptor.

    A ``functools.partial`` or a callable object set on the class has no ``__get__``:
    LangChain calls it as it is, without the handler.
    """
    get = getattr(type(original), "__get__", None)
    return original if get is None else get(original, handler, cls)


# --- recorders -------------------------------------------------------------------


def recorder_for(hook: str, original: Any) -> Callable[..., Any]:
    """The method LangChain calls in place of ``hook``: record the event and return.

    The two common cases are inlined here: offload with room in the queue (one
    append, no call into the engine) and inline (call the hook in the caller,
    count it). Everything else goes through ``Engine.record``.
    """
    owner: list[type] = []  # the class whose body this recorder stands in
    plain = isinstance(original, FunctionType)
    is_async = is_async_callable(original)
    settles = hook in END_HOOKS
    starts = hook in START_HOOKS  # through Engine.record, which marks the run for routing

    def recorder(self: Any, *args: Any, **kwargs: Any) -> Any:
        cls = type(self)
        if cls is not owner[0] and getattr(cls, hook) is not recorder:
            # Reached through super() from a subclass's own hook body, which is
            # being delivered right now: run the original, do not record again.
            return bound(original, self, cls)(*args, **kwargs)
        try:
            engine = self._sc_engine
            if engine.target is not self:
                engine = _bind(self)
        except AttributeError:
            engine = _bind(self)
        lane = engine.fast_lane
        loop = None
        if lane is None and engine.fast_loop_lanes is not None:
            # An async handler, offloaded: the lane of the emitting loop, if it has one.
            loop = _get_running_loop()
            lane = engine.fast_loop_lanes.get(loop)
        if lane is not None and not starts:
            # Ctrl-C lands between two calls: every step that can be cut off comes before the
            # count, and the count and the append cannot be told apart (Lane._count_and_append).
            item = (hook, args, kwargs, copy_context(), monotonic(), loop)
            queue = lane.queue
            if len(queue) >= lane.nudge_at:
                lane.overflow(item)
            else:
                try:  # costs nothing unless something is raised
                    next(lane.emitted)
                except BaseException:  # interrupted once counted: queued all the same
                    queue.append(item)
                    raise
                queue.append(item)
                if not lane.scheduled:
                    lane.kick()  # an interrupt before it: the next event or flush kicks
        elif engine.inline_ready and not is_async:
            started = monotonic()
            try:
                if engine.bare_run_inline or _getframe(1).f_code is not _ASYNC_MANAGER_CODE:
                    if plain:
                        result = original(self, *args, **kwargs)
                    else:
                        result = bound(original, self, cls)(*args, **kwargs)
                else:
                    # Bare, LangChain would run it in an executor with a copy of the
                    # context: context it sets must not leak into the caller's.
                    result = copy_context().run(bound(original, self, cls), *args, **kwargs)
            except BaseException as exc:
                engine.inline.failed(hook, exc, args, kwargs)
                engine.check_stall(hook, started)
                return None
            if result is not None and type(result) not in _PLAIN_RESULTS:
                engine.inline.result(hook, result, args, kwargs)
            else:
                next(engine.inline_counts[hook])  # emitted and delivered in one count
                if engine.failing:
                    engine.observer.outcome(True)
            if monotonic() - started > engine.adapt.stall_limit:
                engine.check_stall(hook, started)
            return None  # nothing of an inline handler's is left to settle
        else:
            engine.record(hook, args, kwargs)
        if settles and engine.options.settle and kwargs.get("parent_run_id") is None:
            engine.settle_now(kwargs.get("run_id"))
        return None

    recorder.__name__ = hook
    recorder.__qualname__ = getattr(original, "__qualname__", hook)
    recorder.__doc__ = getattr(original, "__doc__", None)
    recorder._sc_owner = owner  # type: ignore[attr-defined]
    return recorder


async def _coroutine_shape(*args: Any, **kwargs: Any) -> None:
    """Never called: lends its code object to ``_AwaitedHook``."""


class _AwaitedHook:
    """A hook LangChain's async manager must await, shaped like a coroutine function.

    LangChain awaits hooks that look like coroutine functions (it checks the
    code flags, or asyncio's marker on older engines) and calls the rest in
    place; its sync manager calls every hook and runs whatever coroutine comes
    back on a throwaway event loop. So this returns a coroutine only when
    LangChain's async manager is the caller; from the sync manager it records
    like any other hook and returns None.
    """

    __code__ = _coroutine_shape.__code__
    __defaults__ = None
    __kwdefaults__ = None
    _is_coroutine = _compat.COROUTINE_MARKER

    def __init__(
        self,
        handler: Any,
        engine: Engine,
        hook: str,
        recorder: Callable[..., Any],
        records: bool,
    ) -> None:
        self.handler = handler
        self.engine = engine
        self.recorder = recorder
        self.records = records
        self.__name__ = self.__qualname__ = hook
        self.__annotations__: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _compat.called_by_async_manager():
            if self.records:
                return self.engine.adeliver(self.__name__, args, kwargs)
            return self.engine.asettle_after(self.__name__, kwargs)
        return self.recorder(self.handler, *args, **kwargs)


class HookAttribute:
    """Class attribute for a hook that LangChain's async manager may have to await.

    Inline handlers' async hooks are awaited in the caller's task, as LangChain
    would await them bare; with ``settle``, the ends of root runs are awaited
    so the backlog can settle without blocking the loop. Otherwise it is the
    plain recorder.
    """

    def __init__(self, hook: str, recorder: Callable[..., Any], records: bool = True) -> None:
        self.hook = hook
        self.recorder = recorder
        self.records = records
        self._sc_owner = recorder._sc_owner  # type: ignore[attr-defined]
        self.__doc__ = recorder.__doc__

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self.recorder
        engine = obj.__dict__.get("_sc_engine")  # engine_of, inlined: read per event
        if engine.__class__ is not Engine or engine.target is not obj:
            engine = _bind(obj)
        if self.hook in engine.awaited_hooks:
            return _AwaitedHook(obj, engine, self.hook, self.recorder, self.records)
        return MethodType(self.recorder, obj)


def is_settler(value: Any) -> bool:
    """True for what stands in for a hook the handler does not implement."""
    if isinstance(value, HookAttribute):
        return not value.records
    return getattr(value, "_sc_stand_in", False) is True


def tracker(hook: str) -> Callable[..., None]:
    """A run start the handler does not implement: nothing to deliver, but the run's
    later events (tokens it does implement) are routed by where it started."""

    def track(self: Any, *args: Any, **kwargs: Any) -> None:
        engine_of(self).mark_run(kwargs, ends=False)

    track.__name__ = track.__qualname__ = hook
    track._sc_owner = []  # type: ignore[attr-defined]
    track._sc_stand_in = True  # type: ignore[attr-defined]
    return track


def settler(hook: str) -> HookAttribute:
    """An end hook the handler does not implement: nothing to deliver, but the run's
    end still matters: a pending stop is raised into it, a later one is known to be
    too late, and with ``settle`` a root run's end waits for the handler's backlog."""

    def settle(self: Any, *args: Any, **kwargs: Any) -> None:
        engine = engine_of(self)
        engine.stops.end_emitted(hook, kwargs)
        engine.mark_run(kwargs, ends=True)
        if engine.options.settle and kwargs.get("parent_run_id") is None:
            engine.settle_now(kwargs.get("run_id"))

    settle.__name__ = hook
    settle._sc_owner = []  # type: ignore[attr-defined]
    return HookAttribute(hook, settle, records=False)
