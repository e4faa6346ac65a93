"""Class hardening: the generated subclass whose hooks are recorders.

``harden(h)`` and ``harden(SomeClass)`` make (once per class and options) a
subclass of the handler's own class, so ``isinstance`` holds and its state
and other methods stay its own; ``SafeHandler`` subclasses get the same
treatment from ``__init_subclass__``. Every hook the class implements, its own
or inherited (framework hooks included), gets a recorder; ``ignore_*``
properties are made unable to raise. Nothing here runs on the token path.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import inspect
import operator
import threading
from collections.abc import Mapping
from typing import Any, SupportsIndex, cast

from langchain_core.callbacks import BaseCallbackHandler

from . import _compat
from ._compat import fork_safe
from ._hardened import (
    ENGINE_LOCK,
    HookAttribute,
    _Hardened,
    engine_of,
    is_settler,
    make_engine,
    recorder_for,
    settler,
    tracker,
)
from ._hooks import (
    END_HOOKS,
    IGNORE_FLAGS,
    START_HOOKS,
    hooks_on_instance,
    implemented_hooks,
    instance_hooks_error,
    is_async_callable,
)
from ._options import Options, make_options

_BASE_FLAGS = {flag: BaseCallbackHandler.__dict__[flag] for flag in IGNORE_FLAGS}


def _isolated_flag(flag: str, original: Any) -> property:
    """An ``ignore_*`` property that can never raise into LangChain."""

    def safe(self: Any) -> bool:
        try:
            return bool(original.__get__(self, type(self)))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            engine_of(self).observer.announce_once(
                f"flag:{flag}", "ignore_flag_failed", flag=flag, error_type=type(exc).__qualname__
            )
            return False

    guarded = property(safe, doc=f"{flag}, read from the handler's own definition, never raising.")
    safe._sc_flag = True  # type: ignore[attr-defined]
    return guarded


def _is_guarded(value: Any) -> bool:
    return isinstance(value, property) and getattr(value.fget, "_sc_flag", False)


def _checking_init(cls: type, init: Any) -> Any:
    """``init`` followed by the check ``harden()`` makes: no hook set on the instance.

    A class hardened as a whole (``SafeHandler``, ``harden(SomeClass)``) has its
    engine before ``__init__`` runs; a hook that ``__init__`` sets on the instance
    would be what LangChain calls, unhardened, so construction refuses it.
    """

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        found = hooks_on_instance(self)
        if found:
            raise instance_hooks_error(self, found)

    __init__._sc_checks = True  # type: ignore[attr-defined]
    return __init__


def _check_instance_hooks_after_init(cls: type) -> None:
    init = cls.__dict__.get("__init__")
    if init is None:  # a made class: check after the init it inherits
        base_init = getattr(cls.__mro__[1], "__init__")  # noqa: B009 - no instance here
        made: Any = cls

        def inherited(self: Any, *args: Any, **kwargs: Any) -> None:
            super(made, self).__init__(*args, **kwargs)

        functools.update_wrapper(inherited, base_init)
        init = inherited
    elif getattr(init, "_sc_checks", False) or not callable(init):
        return
    type.__setattr__(cls, "__init__", _checking_init(cls, init))


def harden_class_body(cls: type) -> None:
    """Give ``cls`` a recorder for every hook it implements, its own or inherited."""
    _check_instance_hooks_after_init(cls)
    originals: dict[str, Any] = {}
    for hook, value in implemented_hooks(cls, look_past=is_settler).items():
        if getattr(value, "_sc_owner", None) is not None:
            continue  # already a recorder, from a hardened base
        originals[hook] = value
        recorder = recorder_for(hook, value)
        recorder._sc_owner.append(cls)  # type: ignore[attr-defined]
        needs_attribute = is_async_callable(value) or hook in END_HOOKS
        setattr(cls, hook, HookAttribute(hook, recorder) if needs_attribute else recorder)
    for hook in END_HOOKS:
        current = inspect.getattr_static(cls, hook, None)
        if hook not in originals and getattr(current, "_sc_owner", None) is None:
            setattr(cls, hook, settler(hook))
    # on_chat_model_start is left out: LangChain falls back to on_llm_start without it.
    for hook in START_HOOKS - {"on_chat_model_start"}:
        current = inspect.getattr_static(cls, hook, None)
        if hook not in originals and getattr(current, "_sc_owner", None) is None:
            setattr(cls, hook, tracker(hook))
    for attr in ("raise_error", "run_inline"):  # never re-raise, never hop threads
        setattr(cls, attr, _Hardened.__dict__[attr])
    for flag in IGNORE_FLAGS:
        value = inspect.getattr_static(cls, flag, None)
        if (
            isinstance(value, property)
            and value is not _BASE_FLAGS[flag]
            and not _is_guarded(value)
        ):
            setattr(cls, flag, _isolated_flag(flag, value))
    cls._sc_originals = originals  # type: ignore[attr-defined]
    resolved: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        resolved.update(klass.__dict__.get("_sc_originals", {}))
    cls._sc_resolved = resolved  # type: ignore[attr-defined]


def _hardened_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``__new__`` of hardened classes: place the engine's stand-in before ``__init__`` runs.

    A handler made by a copying method of a hardened handler of the same class
    (``self.__class__(...)`` in ``LangChainTracer.copy_with_metadata_defaults``)
    joins that handler's family and takes its options. One made by any other
    method (a per-request factory) is a handler of its own: closing the maker
    must not close it, nor its stats count its events.
    """
    new: Any = object.__new__
    for klass in cls.__mro__:
        found = klass.__dict__.get("__new__")
        if found is not None and getattr(found, "__func__", found) is not _hardened_new:
            new = getattr(found, "__func__", found)
            break
    instance = new(cls) if new is object.__new__ else new(cls, *args, **kwargs)
    maker = _compat.copying_self()
    if type(maker) is cls:
        parent = engine_of(maker)
        made = make_engine(instance, parent.requested, parent)
    else:
        made = make_engine(instance, cast(Any, cls)._sc_default_options)
    with contextlib.suppress(AttributeError):  # no __dict__: bound on first use
        instance.__dict__["_sc_engine"] = made
    return instance


class _HardenedClassBase(_Hardened):
    """Hooks defined in a subclass body, or inherited, are hardened; the engine is per instance.

    Shared by ``SafeHandler`` and by the classes ``harden`` makes from a handler class.
    """

    __slots__ = ()
    _sc_default_options: Options = make_options()
    _sc_resolved: Mapping[str, Any] = {}
    __new__ = _hardened_new

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        harden_class_body(cls)

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """Pickle (and copy) a handler of a made class by naming the class it was made from.

        A class ``harden`` made carries its handler class's name, under which pickle
        finds that class, not this one. What arrives is hardened again, with the same
        options and an engine of its own (the state's engine pickles as ``Unbound``).
        """
        reduced = object.__reduce_ex__(self, max(2, operator.index(protocol)))
        cls = type(self)
        wrapped = cls.__dict__.get("_sc_wrapped_class")
        if wrapped is None or isinstance(reduced, str) or reduced[0] is not _NEWOBJ:
            return reduced  # a class of its own (SafeHandler, @harden): found by its name
        new_args = (wrapped, cast(Any, cls)._sc_default_options, *reduced[1][1:])
        return (_rebuild, new_args, *reduced[2:])


_NEWOBJ: Any = copyreg.__dict__["__newobj__"]  # what object.__reduce_ex__(2+) names


def _rebuild(wrapped: type, defaults: Options, *args: Any) -> Any:
    """Unpickling: an instance of ``wrapped``'s hardened class; its state is set next."""
    cls = hardened_class(wrapped, defaults)
    return cls.__new__(cls, *args)


_classes: dict[tuple[type, Options], type] = {}
_classes_lock = fork_safe(threading.Lock())


def hardened_class(cls: type, options: Options | None = None) -> type:
    """The hardened subclass of ``cls`` (one per class and default options)."""
    defaults = options if options is not None else make_options()
    key = (cls, defaults)
    with _classes_lock:
        found = _classes.get(key)
        if found is not None:
            return found
        namespace: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__slots__": (),
            "__new__": _hardened_new,
            "_sc_default_options": defaults,
            "_sc_wrapped_class": cls,
        }
        ours = {"__new__": staticmethod(_hardened_new), "_sc_wrapped_class": cls}
        made = type(cls.__name__, (cls, _HardenedClassBase), namespace)
        # Some metaclasses rewrite a subclass body in place (MLflow's wraps every
        # callable in it); attributes set after creation stay as written.
        for name, value in ours.items():
            type.__setattr__(made, name, value)
        if "_sc_originals" not in made.__dict__:  # cls's own __init_subclass__ skipped ours
            harden_class_body(made)
        _classes[key] = made
        return made


def harden_in_place(handler: BaseCallbackHandler, options: Options) -> None:
    """Make ``handler`` an instance of its hardened class, with its own options.

    Refused (``TypeError``, the handler left as it was) when a hook is set on the
    instance: LangChain would call that, never the recorder.
    """
    found = hooks_on_instance(handler)
    if found:
        raise instance_hooks_error(handler, found)
    hardened = hardened_class(type(handler))
    with ENGINE_LOCK:
        try:  # past the class's own __setattr__ (a frozen dataclass refuses any assignment)
            object.__setattr__(handler, "__class__", hardened)
        except TypeError as exc:
            raise TypeError(
                f"cannot harden {type(handler).__qualname__} in place ({exc}); "
                "harden its class instead: harden(SomeHandler)"
            ) from None
        handler.__dict__["_sc_engine"] = make_engine(handler, options)
