"""``python -m safecallbacks check module:Factory``: grade a handler before production.

Its one job: run fake streams through a user's handler (none, bare, hardened; a paced
model and a CPU-bound one; ``.stream()`` and ``.astream()``) and say, from what was
measured, whether the bare handler would break or stall a stream, and what hardening
changes. This module loads the target and runs the streams; ``_check_report`` grades
the runs and prints them. None of it runs on the token path: it is a command-line
tool that only *observes* streams.

How each number is measured:

* handler time per event: every hook the handler implements is timed around the call,
  in the caller, during the bare runs (a thin subclass swapped in for the fresh
  instance; each hook's wall time, including an awaited async hook);
* raised: the same timing layer sees every exception leaving a hook, per hook and type;
* event loop blocked: a 1 ms ticker task runs beside the bare ``.astream()``; its
  largest delay is compared with the same ticker beside the no-handler stream;
* stalls and breaks: what the consumer of each stream saw (chunks, the longest gap
  between two chunks, how the stream ended), each run bounded by ``--timeout``.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import threading
import time
import types
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel

from ._hardened import engine_of
from ._hooks import implemented_hooks, is_async_callable
from ._measure import (
    APIS,
    NOT_RUN,
    LineCounter,
    StreamRun,
    counted_logs,
    describe,
    stream_bounded,
)
from ._paced import PacedFakeChatModel, make_tokens
from ._policy import decide, dotted_name, is_plumbing

GAP_MS = 50.0
"""A bare stream stalls when its longest gap exceeds the no-handler one by more."""
P99_MS = 5.0
"""A handler stalls streams when its per-event time at p99 exceeds this."""
LAG_MS = 50.0
"""An async handler blocks the event loop when the ticker's delay grows by more."""
RULE = (
    f"exit 1 when the bare handler would break a stream (an exception reaches the "
    f"consumer, or the stream ends short of the chunks it had without a handler) or "
    f"stall one (a stream did not finish within --timeout; its longest gap between "
    f"chunks exceeds the no-handler gap by more than {GAP_MS:g} ms; the handler's "
    f"per-event time at p99 exceeds {P99_MS:g} ms; or a 1 ms ticker on the event loop "
    f"is delayed {LAG_MS:g} ms more than without the handler); exit 2 when the target "
    f"is not a handler factory; exit 0 otherwise"
)


# --------------------------------------------------------------------------- the target


class TargetError(Exception):
    """The ``module:Factory`` given to ``check`` does not make a callback handler."""


_NEEDS = "check needs a handler class or a zero-argument callable returning a handler"


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``module`` and return its ``Factory`` (dots reach nested attributes)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise TargetError(f"expected module:Factory (e.g. myapp.callbacks:Audit), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's modules are here
    try:
        found: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise TargetError(f"cannot import module {module_name!r}: {describe(exc)}") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise TargetError(f"module {module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    if isinstance(found, type) and not issubclass(found, BaseCallbackHandler):
        raise TargetError(
            f"{spec} is the class {found.__qualname__}, not a LangChain callback handler "
            f"(a subclass of BaseCallbackHandler); {_NEEDS}"
        )
    if not callable(found):
        raise TargetError(f"{spec} is a {type(found).__name__}, not callable; {_NEEDS}")
    return found  # type: ignore[no-any-return]


def make_handler(factory: Callable[[], Any], spec: str) -> BaseCallbackHandler:
    """A fresh handler from ``factory``, or a ``TargetError`` saying what was wrong."""
    from ._hardened import _Hardened

    try:
        made = factory()
    except (Exception, SystemExit) as exc:
        raise TargetError(
            f"{spec} is not a handler factory: calling it with no arguments raised "
            f"{describe(exc)}; {_NEEDS}"
        ) from None
    if not isinstance(made, BaseCallbackHandler):
        raise TargetError(
            f"{spec}() returned {type(made).__qualname__} ({made!r:.60}), not a LangChain "
            f"callback handler (a BaseCallbackHandler); {_NEEDS}"
        )
    if isinstance(made, _Hardened):
        raise TargetError(
            f"{spec}() returned a handler that is already hardened (harden() or "
            "SafeHandler); check grades the plain handler: give it the unhardened class"
        )
    if is_plumbing(type(made)):
        raise TargetError(f"{dotted_name(type(made))} is LangChain's own plumbing, not a handler")
    return made


# --------------------------------------------------------------------------- timing hooks


@dataclass
class HookTimes:
    """Wall time of every hook call of the bare handler, and what left each hook raising."""

    samples: list[float] = field(default_factory=list)
    raised: dict[tuple[str, str], int] = field(default_factory=dict)
    first: dict[tuple[str, str], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, hook: str, started: float, error: BaseException | None) -> None:
        took = time.perf_counter() - started
        with self.lock:
            self.samples.append(took)
            if error is not None and not (
                hook == "on_chat_model_start" and isinstance(error, NotImplementedError)
            ):  # LangChain's own signal to fall back to on_llm_start
                key = (hook, type(error).__name__)
                self.raised[key] = self.raised.get(key, 0) + 1
                self.first.setdefault(key, describe(error))

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


class _Timing:
    """Times one hook call and notes what left it raising (then lets it go on its way)."""

    __slots__ = ("hook", "started", "times")

    def __init__(self, times: HookTimes, hook: str) -> None:
        self.times, self.hook = times, hook

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.times.add(self.hook, self.started, error)


def _timed(hook: str, bound: Any, times: HookTimes) -> Any:
    if is_async_callable(bound):

        async def timed_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _Timing(times, hook):
                return await bound(*args, **kwargs)

        return timed_async

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _Timing(times, hook):
            return bound(*args, **kwargs)

    return timed


def time_hooks(handler: BaseCallbackHandler, times: HookTimes) -> bool:
    """Swap in a thin subclass of the handler's class that times each hook it implements.

    Same name, same ``isinstance``, same state and the same sync/async shape of every
    hook, so LangChain treats it exactly as the bare handler. False when the class
    cannot be swapped (an unusual layout): then the hardened stats time the handler.
    """
    cls = type(handler)
    body: dict[str, Any] = {"__slots__": (), "__module__": cls.__module__}
    for hook in implemented_hooks(handler):
        body[hook] = _timed(hook, getattr(handler, hook), times)
    try:
        timed_cls = types.new_class(cls.__name__, (cls,), exec_body=lambda ns: ns.update(body))
        timed_cls.__qualname__ = cls.__qualname__
        handler.__class__ = timed_cls
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class CheckConfig:
    """The streams ``check`` runs and how long it waits for them."""

    tokens: int = 60  # of the paced stream; the CPU-bound one has about as many chunks
    interval: float = 0.005  # seconds between paced tokens
    timeout: float = 3.0  # a stream still running after this is reported stalled
    flush_timeout: float = 1.0  # how long a hardened handler's backlog is waited for


@dataclass
class Runs:
    """Every stream of one check, by (model, api, attachment)."""

    cfg: CheckConfig
    streams: dict[tuple[str, str, str], StreamRun] = field(default_factory=dict)
    times: dict[str, HookTimes] = field(default_factory=lambda: {a: HookTimes() for a in APIS})
    cls: type = BaseCallbackHandler
    timed: bool = True
    mode: str = ""
    mode_reason: str = ""
    offload_differs: list[str] = field(default_factory=list)  # state read right after a call
    printed: int = 0

    def model(self, kind: str) -> BaseChatModel:
        if kind == "paced":
            return PacedFakeChatModel(
                tokens=make_tokens(self.cfg.tokens), interval=self.cfg.interval
            )
        from .testing import fake_chat_model  # words and the spaces between: ~tokens chunks

        return fake_chat_model(tokens=max(2, self.cfg.tokens // 2))


MODELS = ("paced", "cpu")


def run_check(spec: str, cfg: CheckConfig) -> Runs:
    """Stream every model and api with no handler, the bare handler, then hardened ones.

    Every handler is a fresh ``Factory()``. Once a bare stream stalls past the
    timeout, the CPU-bound bare streams are not run (a hung handler would only
    hang them too); the paced ones always are.
    """
    from . import close, harden, stats

    factory = load_factory(spec)
    first: BaseCallbackHandler | None = make_handler(factory, spec)
    runs = Runs(cfg, cls=type(first))
    streams = runs.streams
    printed = LineCounter(forward=False)
    with counted_logs() as logs, redirect_stdout(printed):
        for api in APIS:  # warm up: first-use imports and caches are no handler's cost
            stream_bounded(runs.model("cpu"), None, api, 0, cfg.timeout)
        for kind, api in _EVERY_STREAM:
            run = stream_bounded(
                runs.model(kind), None, api, cfg.tokens, cfg.timeout, probe=kind == "paced"
            )
            run.total = run.chunks if kind == "cpu" else run.total
            streams[kind, api, "none"] = run
        for kind, api in _EVERY_STREAM:
            expected = streams[kind, api, "none"].chunks
            stalled = any(r.timed_out for key, r in streams.items() if key[2] == "bare")
            if kind == "cpu" and stalled:
                streams[kind, api, "bare"] = StreamRun(expected, error=NOT_RUN)
                continue
            bare, first = first or make_handler(factory, spec), None
            runs.timed = time_hooks(bare, runs.times[api]) and runs.timed
            before = logs.lines
            run = stream_bounded(
                runs.model(kind), bare, api, expected, cfg.timeout, probe=kind == "paced"
            )
            run.log_lines = logs.lines - before
            streams[kind, api, "bare"] = run
        for kind, api in _EVERY_STREAM:
            safe = harden(make_handler(factory, spec))
            expected = streams[kind, api, "none"].chunks
            # A root run's end may wait up to ``settle`` for the backlog: not a stall.
            limit = cfg.timeout + engine_of(safe).options.settle
            run = stream_bounded(
                runs.model(kind), safe, api, expected, limit, flush_timeout=cfg.flush_timeout
            )
            run.stats = stats(safe)
            runs.mode, runs.mode_reason = run.stats.mode, run.stats.mode_reason
            close(safe, timeout=0.1)
            stats(safe)  # writes the log lines close() queued while they are still counted
            streams[kind, api, "hardened"] = run
        if not any(r.timed_out for r in streams.values()):
            runs.offload_differs = differs_offloaded(factory, spec, runs.model, cfg)
    if not runs.mode:
        decision = decide(runs.cls)
        runs.mode, runs.mode_reason = decision.mode, decision.reason
    runs.printed = printed.lines
    return runs


_ADDRESS = re.compile(r" at 0x[0-9a-f]+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f-]{27}|\d+\.\d+")


def differs_offloaded(
    factory: Callable[[], Any], spec: str, model: Callable[[str], BaseChatModel], cfg: CheckConfig
) -> list[str]:
    """The attributes a handler holds right after a call that differ inline vs offloaded.

    Both are fresh handlers, hardened one each way, read without a flush as a user
    reads a collector; ids, addresses and numbers with a fraction are ignored.
    """
    from . import close, harden, stats

    seen = []
    for mode in ("inline", "offload"):
        handler = harden(make_handler(factory, spec), mode=mode, settle=cfg.flush_timeout)
        stream_bounded(model("cpu"), handler, "sync", 0, cfg.timeout + cfg.flush_timeout)
        seen.append({k: _ADDRESS.sub("", repr(v)) for k, v in vars(handler).items()})
        close(handler, timeout=cfg.flush_timeout)
        stats(handler)  # writes what close() logged while logs are still counted
    inline, offloaded = seen
    return sorted(
        name
        for name in set(inline) | set(offloaded)
        if not name.startswith("_sc_") and inline.get(name) != offloaded.get(name)
    )


_EVERY_STREAM = [(kind, api) for kind in MODELS for api in APIS]
