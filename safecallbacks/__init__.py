"""safecallbacks: LangChain callback handlers that cannot break, stall or tax a stream.

Four ways in::

    class AuditLog(SafeHandler): ...            # subclass: every hook you define is hardened
    handler = harden(SomeHandler())             # harden a handler (or decorate a class)
    config = harden_config({"callbacks": [a]})  # every handler of a RunnableConfig
    safecallbacks.install()                     # every handler LangChain runs, from anywhere

and ``with safecallbacks.scope() as s: ...; s.flush()`` to flush what one request
emitted (``@scoped`` for a function, ``safecallbacks.asgi`` for an ASGI app).

A hardened handler is still the handler: same class for ``isinstance``, same
state, same data out. See the documentation (``docs/``) for the guarantees and the
measured problem they solve.
"""

from __future__ import annotations

import contextlib

__version__ = "0.2.0"

from ._handler import (
    SafeHandler,
    aclose,
    aflush,
    close,
    flush,
    harden,
    harden_config,
    stats,
)
from ._install import install, uninstall
from ._options import Breaker
from ._policy import register_inline, register_offload, register_plumbing
from ._scope import Scope, scope, scoped
from ._stats import HookStats, Stats, Summary
from ._stopping import StopStream

__all__ = [
    "Breaker",
    "HookStats",
    "SafeHandler",
    "Scope",
    "Stats",
    "StopStream",
    "Summary",
    "__version__",
    "aclose",
    "aflush",
    "close",
    "flush",
    "harden",
    "harden_config",
    "install",
    "register_inline",
    "register_offload",
    "register_plumbing",
    "scope",
    "scoped",
    "stats",
    "uninstall",
]

for _name in __all__:
    _public = globals()[_name]
    if hasattr(_public, "__module__") and not isinstance(_public, str):
        with contextlib.suppress(AttributeError, TypeError):  # builtins keep theirs
            _public.__module__ = __name__
del _name, _public
