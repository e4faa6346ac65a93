"""What one ``on_llm_new_token`` event costs the stream, under LangChain's own managers.

A run manager is obtained the way a chat model gets one (``CallbackManager.configure``
then ``on_chat_model_start``; the async managers for the async path) and
``run_manager.on_llm_new_token(token, chunk=chunk)`` is timed in a tight loop. This is
the whole price the emitting code pays per token; everything else a hardened handler
does happens on another thread or task.

    python benchmarks/hot_path.py [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import _common as c
from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGenerationChunk, LLMResult

SERIALIZED: dict[str, Any] = {"name": "hot_path_bench"}
MESSAGES: list[list[BaseMessage]] = [[HumanMessage(content="hi")]]


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    factory: Callable[[], Any] | None
    hardened: bool = False
    slow: bool = False  # far costlier per event: use fewer events
    gated: bool = False  # delivery held back while timing (handler is a closed Gated)
    max_queue: int | None = None
    gc_off: bool = False  # cyclic GC paused while timing


CONFIGS = [
    Config("none", "no handler", None),
    Config("inline", "bare no-op, `run_inline=True`", c.NoOpInline),
    Config("sync", "bare no-op, default sync handler", c.NoOp, slow=True),
    Config("async", "bare no-op, async handler", c.AsyncNoOp, slow=True),
    Config("h_sync", "hardened no-op (sync handler)", c.NoOp, hardened=True),
    Config("h_async", "hardened no-op (async handler)", c.AsyncNoOp, hardened=True),
    Config("h_fail", "hardened always-raising handler", c.Failing, hardened=True),
    # diagnostics: the recording side alone, with delivery held back while timing
    Config(
        "h_held",
        "hardened, delivery held (recording only)",
        c.Gated,
        hardened=True,
        gated=True,
        max_queue=10**7,
    ),
    Config(
        "h_held_nogc",
        "hardened, delivery held, GC paused while timing",
        c.Gated,
        hardened=True,
        gated=True,
        max_queue=10**7,
        gc_off=True,
    ),
    Config(
        "h_full",
        "hardened, queue full (every event dropped)",
        c.Gated,
        hardened=True,
        gated=True,
        max_queue=64,
    ),
]


DIAGNOSTIC = {"h_full", "h_held_nogc"}


@dataclass
class Result:
    ns_per_event: list[float]
    events: int
    settled: c.Settled


def make_chunk() -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=" tok"))


def build(lib: ModuleType | None, cfg: Config) -> tuple[list[Any], Any, Any]:
    """Return (callbacks, hardened wrapper or None, the raw handler or None)."""
    if cfg.factory is None:
        return [], None, None
    handler = cfg.factory()
    if cfg.hardened:
        assert lib is not None
        options = {} if cfg.max_queue is None else {"max_queue": cfg.max_queue}
        hardened = lib.harden(handler, name=cfg.key, **options)
        return [hardened], hardened, handler
    return [handler], None, handler


def hold(cfg: Config, handler: Any, closed: bool) -> None:
    if cfg.gc_off:
        if closed:
            gc.disable()
        else:
            gc.enable()
    if cfg.gated:
        if closed:
            handler.gate.clear()
        else:
            handler.gate.set()


def bench_sync(lib: ModuleType | None, cfg: Config, events: int, repeats: int) -> Result:
    callbacks, hardened, handler = build(lib, cfg)
    manager = CallbackManager.configure(inheritable_callbacks=callbacks)
    run = manager.on_chat_model_start(SERIALIZED, MESSAGES)[0]
    chunk = make_chunk()
    emit = run.on_llm_new_token
    for _ in range(min(events, 500)):  # warm-up
        emit(" tok", chunk=chunk)
    if hardened is not None:
        hardened.flush(timeout=30.0)
    samples: list[float] = []
    for _ in range(repeats):
        gc.collect()  # same GC state before every timed repeat
        hold(cfg, handler, closed=True)
        t0 = time.perf_counter_ns()
        for _ in range(events):
            emit(" tok", chunk=chunk)
        samples.append((time.perf_counter_ns() - t0) / events)
        hold(cfg, handler, closed=False)
        if hardened is not None:  # untimed: let the worker catch up between repeats
            hardened.flush(timeout=30.0)
    run.on_llm_end(LLMResult(generations=[[]]))
    return Result(samples, events, c.settle(hardened, timeout=30.0))


async def bench_async(lib: ModuleType | None, cfg: Config, events: int, repeats: int) -> Result:
    callbacks, hardened, handler = build(lib, cfg)
    manager = AsyncCallbackManager.configure(inheritable_callbacks=callbacks)
    run = (await manager.on_chat_model_start(SERIALIZED, MESSAGES))[0]
    chunk = make_chunk()
    emit = run.on_llm_new_token
    for _ in range(min(events, 500)):
        await emit(" tok", chunk=chunk)
    if hardened is not None:
        await hardened.aflush(timeout=30.0)
    samples: list[float] = []
    for _ in range(repeats):
        gc.collect()  # same GC state before every timed repeat
        hold(cfg, handler, closed=True)
        t0 = time.perf_counter_ns()
        for _ in range(events):
            await emit(" tok", chunk=chunk)
        samples.append((time.perf_counter_ns() - t0) / events)
        hold(cfg, handler, closed=False)
        if hardened is not None:
            await hardened.aflush(timeout=30.0)
    await run.on_llm_end(LLMResult(generations=[[]]))
    settled = c.Settled()
    if hardened is not None:
        ok = bool(await hardened.aflush(timeout=30.0))
        settled = c.Settled(flushed=ok, stats=hardened.stats())
        await hardened.aclose(timeout=0.5)
    return Result(samples, events, settled)


def report(
    results: dict[tuple[str, str], Result], events: int, repeats: int
) -> tuple[str, list[list[str]]]:
    headers = [
        "handler",
        "events/repeat",
        "ns/event (median)",
        "added vs none (ns)",
        "vs no handler",
        "vs bare run_inline no-op",
        "hardened stats after flush",
    ]
    out: list[str] = []
    goal_rows: list[list[str]] = []
    for mode, api in (
        ("sync", "CallbackManagerForLLMRun (sync streams)"),
        ("async", "AsyncCallbackManagerForLLMRun (async streams)"),
    ):
        base = c.median(results[(mode, "none")].ns_per_event)
        inline = c.median(results[(mode, "inline")].ns_per_event)
        rows: list[list[str]] = []
        for cfg in CONFIGS:
            res = results.get((mode, cfg.key))
            if res is None:
                continue
            ns = c.median(res.ns_per_event)
            rows.append(
                [
                    cfg.label,
                    f"{res.events:,}",
                    c.fmt_num(ns, 0),
                    c.fmt_num(ns - base, 0),
                    c.fmt_ratio(c.ratio(ns, base)),
                    c.fmt_ratio(c.ratio(ns, inline)),
                    res.settled.summary(),
                ]
            )
            if cfg.hardened:
                r = c.ratio(ns, inline)
                goal_rows.append(
                    [
                        api.split(" ")[0],
                        cfg.label,
                        c.fmt_num(ns, 0),
                        c.fmt_num(inline, 0),
                        c.fmt_ratio(r),
                        "n/a (diagnostic)"
                        if cfg.key in DIAGNOSTIC
                        else c.verdict(c.shown(r) <= 1.3),
                    ]
                )
        out.append(f"#### `run_manager.on_llm_new_token()` via {api}\n")
        out.append(c.md_table(headers, rows, right=(1, 2, 3, 4, 5)))
        out.append("")
    if goal_rows:
        out.append("#### Goal: hardened <= 1.3x a bare `run_inline` no-op\n")
        out.append(
            c.md_table(
                ["manager", "handler", "hardened ns", "bare run_inline ns", "ratio", "goal"],
                goal_rows,
                right=(2, 3, 4),
            )
        )
        out.append("")
    return "\n".join(out), goal_rows


def main(argv: list[str] | None = None) -> int:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else "hot path")
    parser.add_argument("--events", type=int, help="events per timed repeat")
    args = parser.parse_args(argv)
    c.quiet_logs(args.show_logs)
    events = args.events or (2_000 if args.quick else 20_000)
    repeats = args.repeats or (3 if args.quick else 7)
    lib = c.load_library()
    todo = [cfg for cfg in CONFIGS if lib is not None or not cfg.hardened]
    t0 = time.perf_counter()
    results: dict[tuple[str, str], Result] = {}
    for cfg in todo:
        n = max(200, events // 10) if cfg.slow else events
        print(f"hot_path: {cfg.key} sync", file=sys.stderr, flush=True)
        results[("sync", cfg.key)] = bench_sync(lib, cfg, n, repeats)

    async def all_async() -> None:
        for cfg in todo:
            n = max(200, events // 10) if cfg.slow else events
            print(f"hot_path: {cfg.key} async", file=sys.stderr, flush=True)
            results[("async", cfg.key)] = await bench_async(lib, cfg, n, repeats)

    asyncio.run(all_async())
    text, _ = report(results, events, repeats)
    print("### Hot path: cost of one token event to the emitting code\n")
    print(
        f"_{c.environment_line()}; median over {repeats} repeats of the mean ns/event;"
        " the hardened handler is flushed (untimed) between repeats._\n"
    )
    print(
        "_A hardened sync handler is delivered on a worker thread that shares the GIL with"
        " the emitting loop, so its rows include whatever delivery work ran during the timed"
        " loop. The async timed loop never yields to the event loop, so hardened async"
        " handlers are delivered after it (untimed). The diagnostic rows hold delivery back"
        " (recording only), also with the cyclic GC paused (queued events survive into older"
        " GC generations and make full collections more frequent), and show the drop path when"
        " the queue is full._\n"
    )
    print(text)
    print(f"_hot_path took {time.perf_counter() - t0:.0f} s._\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
