"""What a handler class tells about itself before its first event, for ``mode="auto"``.

Two questions, answered once per class from its code, never on the token path:

* Where do its hooks come from? A hook body defined in an installed library
  (site-packages, the standard library) was written by that library to run in
  its caller; one defined by the application may do anything, blocking I/O
  included.
* Does a hook publish context for the code that runs after it? A hook that sets
  a ``ContextVar`` or makes an OpenTelemetry span current (directly or through a
  helper it calls) must run in the caller, or the code after it sees stale context.
"""

from __future__ import annotations

import contextlib
import functools
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from ._hooks import is_default_hook

# Calls that make something current for the code that runs next, in the context
# APIs tracing SDKs build on (OpenTelemetry's context and tracer, structlog's
# context). Publishing context is what they are for, whatever the SDK.
PUBLISHING_CALLS = frozenset(
    {"attach", "start_as_current_span", "use_span", "bind_contextvars", "set_current"}
)
_SCAN_DEPTH = 3  # helpers followed from a hook: self._start_span() -> context.attach()


@functools.cache
def _library_roots() -> tuple[str, ...]:
    roots: set[str] = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            roots.add(paths[key])
    with contextlib.suppress(AttributeError):  # some virtualenv builds of site lack it
        roots.update(site.getsitepackages())
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if isinstance(user_site, str):
        roots.add(user_site)
    return tuple(os.path.realpath(root) + os.sep for root in roots)


_PACKAGE_DIRS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")
# Handlers in safecallbacks' own testing module stand in for the application's.
_APPLICATION_MODULES = frozenset({"safecallbacks.testing"})


@functools.cache
def module_is_library(module_name: str) -> bool:
    """True when ``module_name`` was loaded from an installed distribution or the stdlib."""
    if module_name in _APPLICATION_MODULES or module_name == "__main__":
        return False
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not isinstance(path, str):
        return module_name in sys.builtin_module_names
    real = os.path.realpath(path)
    return any(part in real for part in _PACKAGE_DIRS) or real.startswith(_library_roots())


def hook_module(cls: type, hook: str, value: Any) -> str:
    """The module whose code implements ``hook`` (a function's own, else its class's)."""
    function = _function_of(value)
    if function is not None and isinstance(function.__module__, str):
        return function.__module__
    for klass in cls.__mro__:
        if vars(klass).get(hook) is value:
            return klass.__module__
    return cls.__module__


def application_hooks(cls: type, hooks: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(hook, module) for each implemented hook whose body the application defines."""
    found = []
    for hook, value in sorted(hooks.items()):
        module = hook_module(cls, hook, value)
        if not module_is_library(module):
            found.append((hook, module))
    return found


def library_hooks(cls: type, hooks: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(hook, module) for each hook whose work an installed library does.

    That is a hook the class inherits from a library, or one the application
    overrides with a body that calls ``super()`` into the library's: a subclass
    that extends a library's handler keeps that handler's needs.
    """
    found = []
    for hook, value in sorted(hooks.items()):
        module = hook_module(cls, hook, value)
        if module_is_library(module):
            found.append((hook, module))
            continue
        parent = _super_implementation(cls, hook, value)
        if parent is not None:
            found.append((hook, parent))
    return found


def _super_implementation(cls: type, hook: str, value: Any) -> str | None:
    """The library module ``value`` reaches through ``super()``, if it does."""
    function = _function_of(value)
    if function is None or "super" not in _names_used(function):
        return None
    mro = cls.__mro__
    owner = next((i for i, klass in enumerate(mro) if vars(klass).get(hook) is value), None)
    if owner is None:
        return None
    for klass in mro[owner + 1 :]:
        if hook in vars(klass):
            found = vars(klass)[hook]
            if is_default_hook(found) or klass.__module__.startswith("langchain_core.callbacks"):
                return None
            module = hook_module(klass, hook, found)
            return module if module_is_library(module) else None
    return None


def _names_used(function: types.FunctionType) -> set[str]:
    return {name for code in _codes(function.__code__) for name in code.co_names}


# --- does a hook publish context? ------------------------------------------------


def context_writer(cls: type, hooks: Mapping[str, Any]) -> tuple[str, str] | None:
    """(hook, what it calls) for the first hook that publishes context, else None."""
    for hook, value in sorted(hooks.items()):
        found = _publishes(_function_of(value), cls, _SCAN_DEPTH, set())
        if found is not None:
            return hook, found
    return None


def _function_of(value: Any) -> types.FunctionType | None:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    value = getattr(value, "__wrapped__", value)
    return value if isinstance(value, types.FunctionType) else None


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _publishes(
    function: types.FunctionType | None, cls: type, depth: int, seen: set[int]
) -> str | None:
    if function is None or id(function) in seen or depth < 0:
        return None
    seen.add(id(function))
    names = _names_used(function)
    named = names & PUBLISHING_CALLS
    if named:
        return f"{min(named)}()"
    if "set" in names:
        var = _context_var_named(names, function.__globals__, cls)
        if var is not None:
            return f"ContextVar {var!r}.set()"
    for helper in _helpers(names, function.__globals__, cls):
        found = _publishes(helper, cls, depth - 1, seen)
        if found is not None:
            return found
    return None


def _context_var_named(names: set[str], globals_: Mapping[str, Any], cls: type) -> str | None:
    for name in sorted(names):
        value = globals_.get(name)
        if value is None:
            value = _class_attribute(cls, name)
        if isinstance(value, ContextVar):
            return value.name
    return None


def _class_attribute(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def _helpers(
    names: set[str], globals_: Mapping[str, Any], cls: type
) -> Iterator[types.FunctionType]:
    """Functions a hook may call: the class's own methods and module-level functions."""
    for name in sorted(names):
        candidate: Callable[..., Any] | None = _class_attribute(cls, name)
        if candidate is None:
            candidate = globals_.get(name)
        function = _function_of(candidate)
        if function is not None and not name.startswith("__"):
            yield function
