"""safecallbacks: LangChain callback handlers that cannot break, stall or tax a stream.

Three ways in::

    class AuditLog(SafeHandler): ...            # subclass: every hook you define is hardened
    safe = harden(SomeHandler())                # wrap an instance (or decorate a class)
    config = harden_config({"callbacks": [a]})  # every handler of a RunnableConfig

See the README for the guarantees and the measured problem they solve.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._handler import SafeHandler, harden, harden_config
from ._isolation import StopStream
from ._options import Breaker
from ._stats import HookStats, Stats, Summary

__all__ = [
    "Breaker",
    "HookStats",
    "SafeHandler",
    "Stats",
    "StopStream",
    "Summary",
    "__version__",
    "harden",
    "harden_config",
]
