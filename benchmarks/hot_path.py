"""What one ``on_llm_new_token`` event costs the stream, under LangChain's own managers.

A run manager is obtained the way a chat model gets one (``CallbackManager.configure``
then ``on_chat_model_start``; the async managers for the async path) and
``run_manager.on_llm_new_token(token, chunk=chunk)`` is timed in a tight loop. That loop
is the price the emitting code waits for per token; the clock then keeps running until
the handler's deferred delivery is done ("including delivery"), and process CPU time (all
threads) is taken over the same span. Do-it-yourself offloading (``executor.submit`` per
event, a ``queue.Queue`` drained by one thread) is measured the same way, side by side.

    python benchmarks/hot_path.py [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
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
    diy: type | None = None  # do-it-yourself wrapper around the handler (c.DIY)
    slow: bool = False  # far costlier per event: use fewer events
    gated: bool = False  # delivery held back while timing (handler is a closed Gated)
    max_queue: int | None = None
    gc_off: bool = False  # cyclic GC paused while timing


SUBMIT = "`executor.submit` per event"
QUEUE = "QueueHandler pattern"
FLOOR = "floor: deque + polling thread, call in the event's context, nothing else"

CONFIGS = [
    Config("none", "no handler", None),
    Config("inline", "bare no-op, `run_inline=True`", c.NoOpInline),
    Config(
        "sync",
        "bare no-op, default sync handler (async: LangChain executor hop)",
        c.NoOp,
        slow=True,
    ),
    Config("async", "bare no-op, async handler", c.AsyncNoOp, slow=True),
    Config("h_sync", "hardened no-op (sync handler)", c.NoOp, hardened=True),
    Config("h_async", "hardened no-op (async handler)", c.AsyncNoOp, hardened=True),
    Config("h_fail", "hardened always-raising handler", c.Failing, hardened=True),
    Config("diy_submit", f"DIY: {SUBMIT}, no-op", c.NoOp, diy=c.ExecutorPerEvent),
    Config("diy_queue", f"DIY: {QUEUE}, no-op", c.NoOp, diy=c.QueuePattern),
    Config("floor", FLOOR, c.NoOp, diy=c.MinimalOffload),
    # the recording side alone, with delivery held back while timing
    Config(
        "h_held",
        "hardened, delivery held (recording only)",
        c.Gated,
        hardened=True,
        gated=True,
        max_queue=10**7,
    ),
    Config(
        "diy_submit_held",
        f"DIY: {SUBMIT}, delivery held (recording only)",
        c.Gated,
        diy=c.ExecutorPerEvent,
        gated=True,
    ),
    Config(
        "diy_queue_held",
        f"DIY: {QUEUE}, delivery held (recording only)",
        c.Gated,
        diy=c.QueuePattern,
        gated=True,
    ),
    # diagnostics
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
RECORDING_ONLY = {"h_held", "diy_submit_held", "diy_queue_held"}
# Hot-path targets of the issue: hardened, including delivery, vs a bare run_inline no-op.
TARGET = {"sync": 2.0, "async": 1.4}
# (do-it-yourself row, the hardened row doing the same work): who is cheaper per event.
VERSUS = [
    ("floor", "h_sync"),
    ("sync", "h_sync"),  # async manager only: LangChain's own executor hop
    ("diy_submit", "h_sync"),
    ("diy_queue", "h_sync"),
    ("diy_submit_held", "h_held"),
    ("diy_queue_held", "h_held"),
]


@dataclass
class Result:
    ns_per_event: list[float]  # the emitting loop alone
    total_ns_per_event: list[float]  # until delivery is done (flushed / drained)
    cpu_ns_per_event: list[float]  # process CPU, all threads, same span as total
    events: int
    settled: c.Settled

    @property
    def loop(self) -> float:
        return c.median(self.ns_per_event)

    @property
    def total(self) -> float:
        return c.median(self.total_ns_per_event)

    @property
    def cpu(self) -> float:
        return c.median(self.cpu_ns_per_event)


def make_chunk() -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=" tok"))


def build(lib: ModuleType | None, cfg: Config) -> tuple[list[Any], Any, Any]:
    """Return (callbacks, hardened wrapper or DIY wrapper or None, the raw handler or None)."""
    if cfg.factory is None:
        return [], None, None
    handler = cfg.factory()
    if cfg.hardened:
        assert lib is not None
        options = {} if cfg.max_queue is None else {"max_queue": cfg.max_queue}
        hardened = lib.harden(handler, name=cfg.key, **options)
        return [hardened], hardened, handler
    if cfg.diy is not None:
        wrapper = cfg.diy(handler)
        return [wrapper], wrapper, handler
    return [handler], None, handler


def drain(cfg: Config, waiter: Any) -> None:
    """Wait (blocking) until every event so far is delivered; a no-op for bare handlers."""
    if waiter is None:
        return
    if cfg.diy is not None:
        waiter.drain(timeout=30.0)
    else:
        waiter.flush(timeout=30.0)


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


def bench_sync(
    lib: ModuleType | None, cfg: Config, events: int, repeats: int
) -> Iterator[Result | None]:
    """Yields None before each timed repeat (so configurations can take turns), then the result."""
    callbacks, waiter, handler = build(lib, cfg)
    manager = CallbackManager.configure(inheritable_callbacks=callbacks)
    run = manager.on_chat_model_start(SERIALIZED, MESSAGES)[0]
    chunk = make_chunk()
    emit = run.on_llm_new_token
    for _ in range(min(events, 500)):  # warm-up
        emit(" tok", chunk=chunk)
    drain(cfg, waiter)
    loop: list[float] = []
    total: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        yield None
        gc.collect()  # same GC state before every timed repeat
        hold(cfg, handler, closed=True)
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        for _ in range(events):
            emit(" tok", chunk=chunk)
        t1 = time.perf_counter_ns()
        hold(cfg, handler, closed=False)
        drain(cfg, waiter)  # timed: "including delivery" ends when the queue is empty
        t2 = time.perf_counter_ns()
        c2 = time.process_time_ns()
        loop.append((t1 - t0) / events)
        total.append((t2 - t0) / events)
        cpu.append((c2 - c0) / events)
    run.on_llm_end(LLMResult(generations=[[]]))
    if cfg.diy is not None:
        settled = c.settle_diy(waiter, timeout=30.0)
    else:
        settled = c.settle(waiter, timeout=30.0)
    yield Result(loop, total, cpu, events, settled)


async def bench_async(
    lib: ModuleType | None, cfg: Config, events: int, repeats: int
) -> AsyncIterator[Result | None]:
    """``bench_sync`` through the async manager."""
    callbacks, waiter, handler = build(lib, cfg)
    manager = AsyncCallbackManager.configure(inheritable_callbacks=callbacks)
    run = (await manager.on_chat_model_start(SERIALIZED, MESSAGES))[0]
    chunk = make_chunk()
    emit = run.on_llm_new_token

    async def adrain() -> None:
        if cfg.hardened:
            await waiter.aflush(timeout=30.0)
        else:  # DIY threads: a blocking wait is fine, nothing else runs on this loop
            drain(cfg, waiter)

    for _ in range(min(events, 500)):
        await emit(" tok", chunk=chunk)
    await adrain()
    loop: list[float] = []
    total: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        yield None
        gc.collect()  # same GC state before every timed repeat
        hold(cfg, handler, closed=True)
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        for _ in range(events):
            await emit(" tok", chunk=chunk)
        t1 = time.perf_counter_ns()
        hold(cfg, handler, closed=False)
        await adrain()  # timed: hardened async handlers are delivered here, as loop tasks
        t2 = time.perf_counter_ns()
        c2 = time.process_time_ns()
        loop.append((t1 - t0) / events)
        total.append((t2 - t0) / events)
        cpu.append((c2 - c0) / events)
    await run.on_llm_end(LLMResult(generations=[[]]))
    settled = c.Settled()
    if cfg.hardened:
        ok = bool(await waiter.aflush(timeout=30.0))
        settled = c.Settled(flushed=ok, stats=waiter.stats())
        await waiter.aclose(timeout=0.5)
    elif cfg.diy is not None:
        settled = c.settle_diy(waiter, timeout=30.0)
    yield Result(loop, total, cpu, events, settled)


def turns(keys: list[str], results: dict[str, Result]) -> Iterator[tuple[int, str]]:
    """(round, key) until every key has its result: each configuration runs one timed
    repeat in turn, the order reversed every round, so that a machine getting faster or
    slower shifts every row alike, not the later ones."""
    for round_number in itertools.count():
        if len(results) == len(keys):
            return
        for key in keys if round_number % 2 == 0 else keys[::-1]:
            if key not in results:
                yield round_number, key


def take_turns(runs: dict[str, Iterator[Result | None]]) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for round_number, key in turns(list(runs), results):
        print(f"hot_path: {key} round {round_number}", file=sys.stderr, flush=True)
        step = next(runs[key])
        if step is not None:
            results[key] = step
    return results


async def atake_turns(runs: dict[str, AsyncIterator[Result | None]]) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for round_number, key in turns(list(runs), results):
        print(f"hot_path: {key} async round {round_number}", file=sys.stderr, flush=True)
        step = await anext(runs[key])
        if step is not None:
            results[key] = step
    return results


def report(results: dict[tuple[str, str], Result]) -> str:
    headers = [
        "handler",
        "events/repeat",
        "ns/event (median), emitting loop",
        "vs no handler",
        "ns/event incl. delivery",
        "incl. delivery vs bare run_inline no-op",
        "CPU ns/event (all threads, incl. delivery)",
        "CPU vs no handler",
        "CPU vs bare run_inline no-op",
        "after the run",
    ]
    out: list[str] = []
    goal_rows: list[list[str]] = []
    versus_rows: list[list[str]] = []
    for mode, api in (
        ("sync", "CallbackManagerForLLMRun (sync streams)"),
        ("async", "AsyncCallbackManagerForLLMRun (async streams)"),
    ):
        none = results[(mode, "none")]
        inline = results[(mode, "inline")]
        manager = api.split(" ")[0]
        rows: list[list[str]] = []
        for cfg in CONFIGS:
            res = results.get((mode, cfg.key))
            if res is None:
                continue
            label = cfg.label + (" (diagnostic)" if cfg.key in DIAGNOSTIC else "")
            rows.append(
                [
                    label,
                    f"{res.events:,}",
                    c.fmt_num(res.loop, 0),
                    c.fmt_ratio(c.ratio(res.loop, none.loop)),
                    c.fmt_num(res.total, 0),
                    c.fmt_ratio(c.ratio(res.total, inline.total)),
                    c.fmt_num(res.cpu, 0),
                    c.fmt_ratio(c.ratio(res.cpu, none.cpu)),
                    c.fmt_ratio(c.ratio(res.cpu, inline.cpu)),
                    res.settled.summary(),
                ]
            )
            if cfg.hardened and cfg.key not in DIAGNOSTIC and cfg.key not in RECORDING_ONLY:
                r_wall = c.ratio(res.total, inline.total)
                r_cpu = c.ratio(res.cpu, inline.cpu)
                floor = results.get((mode, "floor"))
                goal_rows.append(
                    [
                        manager,
                        cfg.label,
                        c.fmt_ratio(c.ratio(res.loop, inline.loop)),
                        c.fmt_ratio(r_wall),
                        c.fmt_ratio(r_cpu),
                        c.fmt_ratio(c.ratio(floor.total, inline.total)) if floor else "-",
                        f"<= {TARGET[mode]:.1f}x",
                        both_verdict(r_wall, r_cpu, TARGET[mode]),
                    ]
                )
        for diy_key, hard_key in VERSUS:
            if mode == "sync" and diy_key == "sync":
                continue  # a sync manager calls a default sync handler inline: no hop
            alt = results.get((mode, diy_key))
            hard = results.get((mode, hard_key))
            if alt is None or hard is None:
                continue
            held = diy_key in RECORDING_ONLY
            alt_ns, hard_ns = (alt.loop, hard.loop) if held else (alt.total, hard.total)
            versus_rows.append(
                [
                    manager,
                    next(x.label for x in CONFIGS if x.key == diy_key),
                    "emitting loop" if held else "incl. delivery",
                    c.fmt_num(alt_ns, 0),
                    c.fmt_num(hard_ns, 0),
                    c.fmt_ratio(c.ratio(hard_ns, alt_ns)),
                    c.fmt_num(alt.cpu, 0),
                    c.fmt_num(hard.cpu, 0),
                    c.fmt_ratio(c.ratio(hard.cpu, alt.cpu)),
                    beats(hard_ns, alt_ns, hard.cpu, alt.cpu),
                ]
            )
        out.append(f"#### `run_manager.on_llm_new_token()` via {api}\n")
        out.append(c.md_table(headers, rows, right=tuple(range(1, 9))))
        out.append("")
    if goal_rows:
        out.append(
            "#### Goal: hardened, including delivery, <= 2.0x (sync) / 1.4x (async) a bare"
            " `run_inline` no-op\n"
        )
        out.append(
            c.md_table(
                [
                    "manager",
                    "handler",
                    "emitting loop ratio",
                    "incl. delivery ratio",
                    "CPU ratio",
                    "floor: deque + polling thread, incl. delivery",
                    "target",
                    "goal (wall and CPU)",
                ],
                goal_rows,
                right=(2, 3, 4, 5),
            )
        )
        out.append("")
    if versus_rows:
        out.append("#### Hardened vs do it yourself: cost per event, same no-op work\n")
        out.append(
            c.md_table(
                [
                    "manager",
                    "alternative",
                    "compared on",
                    "alternative ns/event",
                    "hardened ns/event",
                    "hardened / alternative",
                    "alternative CPU ns (incl. delivery)",
                    "hardened CPU ns (incl. delivery)",
                    "CPU hardened / alternative",
                    "hardened cheaper per event?",
                ],
                versus_rows,
                right=(3, 4, 5, 6, 7, 8),
            )
        )
        out.append("")
    return "\n".join(out)


def both_verdict(r_wall: float, r_cpu: float, target: float) -> str:
    missed = [name for name, r in (("wall", r_wall), ("CPU", r_cpu)) if not c.shown(r) <= target]
    return "met" if not missed else f"MISSED ({', '.join(missed)})"


def beats(hard_ns: float, alt_ns: float, hard_cpu: float, alt_cpu: float) -> str:
    wall = c.shown(c.ratio(hard_ns, alt_ns)) < 1.0
    cpu = c.shown(c.ratio(hard_cpu, alt_cpu)) < 1.0
    if wall and cpu:
        return "yes (wall and CPU)"
    if wall or cpu:
        return "wall only" if wall else "CPU only"
    return "no"


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

    def size(cfg: Config) -> int:
        return max(200, events // 10) if cfg.slow else events

    sync_runs = {cfg.key: bench_sync(lib, cfg, size(cfg), repeats) for cfg in todo}
    for key, result in take_turns(sync_runs).items():
        results[("sync", key)] = result

    async def all_async() -> None:
        runs = {cfg.key: bench_async(lib, cfg, size(cfg), repeats) for cfg in todo}
        for key, result in (await atake_turns(runs)).items():
            results[("async", key)] = result

    asyncio.run(all_async())
    text = report(results)
    print("### Hot path: cost of one token event to the emitting code\n")
    print(
        f"_{c.environment_line()}; median over {repeats} repeats of the mean per event, the"
        " configurations taking turns repeat by repeat (order reversed every round);"
        " each repeat is timed from the first event until the handler's queue is empty"
        " (hardened: `flush()`, DIY: a marker through its queue), CPU = process CPU time of"
        " all threads over that span._\n"
    )
    print(
        "_Emitting loop = what the code that emits the tokens waits for. A hardened sync"
        " handler is delivered on a worker thread that shares the GIL with that loop, so the"
        ' loop also carries whatever delivery ran meanwhile; the "recording only" rows hold'
        " delivery back until the loop is done. The async loop never yields, so hardened async"
        ' handlers are delivered (as loop tasks) in the "incl. delivery" span only.'
        " Diagnostic rows: recording with the cyclic GC paused (queued events survive into"
        " older GC generations), and the drop path when the queue is full._\n"
    )
    print(text)
    print(f"_hot_path took {time.perf_counter() - t0:.0f} s._\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
