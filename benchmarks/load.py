"""Many concurrent async streams in one process, sharing the same handlers.

``--streams`` (200) ``PacedFakeChatModel.astream()`` calls run at once on one event loop,
every one of them with the same handler instances attached, as a web server with a
module-level tracing/logging handler would. Reported: aggregate tokens/s, the p99
inter-token gap over all streams and process CPU time (all threads) per token until every
handler has delivered, compared with the same load without handlers. Do-it-yourself
offloading (``executor.submit`` per event, a ``queue.Queue`` drained by one thread, and
LangChain's own executor hop for a plain sync handler) runs the same load beside them.

    python benchmarks/load.py [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import _common as c
from langchain_core.callbacks import BaseCallbackHandler

from safecallbacks.testing import PacedFakeChatModel, make_tokens


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    factories: list[Callable[[], BaseCallbackHandler]] = field(default_factory=list)
    hardened: bool = False
    diy: type | None = None  # do-it-yourself wrapper around each handler (c.DIY)
    backlog: bool = False  # cannot keep up by construction: shorter flush wait
    floor: str = "bare_inline"  # the row with LangChain's own dispatch of as many handlers


def _sleeper() -> BaseCallbackHandler:
    return c.Sleeper(0.002)


def _async_sleeper() -> BaseCallbackHandler:
    return c.AsyncSleeper(0.002)


CONFIGS = [
    Config("none", "no handler"),
    Config("bare_inline", "floor: bare no-op, `run_inline=True`", [c.NoOpInline]),
    Config(
        "bare_inline3",
        "floor: three bare no-ops, `run_inline=True`",
        [c.NoOpInline, c.NoOpInline, c.NoOpInline],
    ),
    Config("bare_async", "bare async no-op", [c.AsyncNoOp]),
    Config("bare_sync", "LangChain default executor hop: bare sync no-op", [c.NoOp]),
    Config("diy_submit", "DIY: executor.submit per event, no-op", [c.NoOp], diy=c.ExecutorPerEvent),
    Config("diy_queue", "DIY: QueueHandler pattern, no-op", [c.NoOp], diy=c.QueuePattern),
    Config(
        "diy_queue3",
        "DIY: QueueHandler pattern, three no-ops",
        [c.NoOp, c.NoOp, c.NoOp],
        diy=c.QueuePattern,
        floor="bare_inline3",
    ),
    Config("h_sync", "hardened sync no-op", [c.NoOp], hardened=True),
    Config(
        "h_sync3",
        "hardened: three sync no-ops",
        [c.NoOp, c.NoOp, c.NoOp],
        hardened=True,
        floor="bare_inline3",
    ),
    Config("h_async", "hardened async no-op", [c.AsyncNoOp], hardened=True),
    Config("h_fail", "hardened always-raising", [c.Failing], hardened=True),
    Config(
        "h_mix",
        "hardened: no-op + raising + async no-op",
        [c.NoOp, c.Failing, c.AsyncNoOp],
        hardened=True,
        floor="bare_inline3",
    ),
    Config(
        "h_slow",
        "hardened sync 2 ms sleep (can't keep up)",
        [_sleeper],
        hardened=True,
        backlog=True,
    ),
    Config(
        "h_aslow",
        "hardened async 2 ms sleep (can't keep up)",
        [_async_sleeper],
        hardened=True,
        backlog=True,
    ),
]


# Alternatives to a hardened handler, each compared with the hardened row doing the same work.
VERSUS = [
    ("bare_sync", "h_sync"),
    ("diy_submit", "h_sync"),
    ("diy_queue", "h_sync"),
    ("diy_queue3", "h_sync3"),
]


@dataclass
class LoadRun:
    wall_ns: int
    cpu_ns: int  # process CPU, all threads, from the start until every handler delivered
    tokens: int
    gaps_ns: list[int]
    errors: int
    settled: list[c.Settled]
    wrappers: list[Any] = field(default_factory=list)


async def one_stream(model: PacedFakeChatModel, callbacks: list[Any]) -> tuple[list[int], int]:
    gaps: list[int] = []
    errors = 0
    prev = time.perf_counter_ns()
    try:
        async for _chunk in model.astream("hi", config={"callbacks": callbacks}):
            now = time.perf_counter_ns()
            gaps.append(now - prev)
            prev = now
    except Exception:
        errors = 1
    return gaps, errors


async def run_load(
    lib: ModuleType | None,
    cfg: Config,
    model: PacedFakeChatModel,
    streams: int,
    flush_timeout: float,
) -> LoadRun:
    handlers = [f() for f in cfg.factories]
    hardened = [lib.harden(h, name=cfg.key) for h in handlers] if cfg.hardened and lib else []
    diy = [cfg.diy(h) for h in handlers] if cfg.diy is not None else []
    callbacks = hardened or diy or handlers
    gc.collect()  # every run starts from the same GC state (untimed)
    c0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    outs = await asyncio.gather(*(one_stream(model, callbacks) for _ in range(streams)))
    wall = time.perf_counter_ns() - t0
    gaps = [g for out, _ in outs for g in out]
    settled: list[c.Settled] = []
    for h in hardened:  # CPU keeps counting until the last handler has delivered
        ok = bool(await h.aflush(timeout=flush_timeout / 2 if cfg.backlog else flush_timeout))
        settled.append(c.Settled(flushed=ok, stats=h.stats(), cpu_done_ns=time.process_time_ns()))
    for d in diy:
        settled.append(await asyncio.to_thread(c.settle_diy, d, flush_timeout))
    cpu = (settled[-1].cpu_done_ns if settled else time.process_time_ns()) - c0
    for h in hardened:
        await h.aclose(timeout=0.2)
    return LoadRun(wall, cpu, len(gaps), gaps, sum(e for _, e in outs), settled, hardened)


def run_isolated(
    lib: ModuleType | None,
    cfg: Config,
    model: PacedFakeChatModel,
    streams: int,
    flush_timeout: float,
) -> LoadRun:
    """One load run on its own event loop, so no backlog leaks into the next run."""
    run = asyncio.run(run_load(lib, cfg, model, streams, flush_timeout))
    # hardened wrappers are settled first, DIY wrappers (no stats) after them
    for h, settled in zip(run.wrappers, run.settled[: len(run.wrappers)], strict=True):
        if not settled.flushed:
            s = h.stats()
            settled.after = f"after close + loop end: drop {s.dropped}, pend {s.pending}"
    run.wrappers = []
    return run


def _chosen(only: str | None) -> set[str] | None:
    if only is None:
        return None
    keys = {key.strip() for key in only.split(",") if key.strip()}
    unknown = keys - {cfg.key for cfg in CONFIGS}
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}")
    return keys | {"none"}


def main(argv: list[str] | None = None) -> int:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else "load")
    parser.add_argument("--streams", type=int, help="concurrent streams (default 200)")
    parser.add_argument("--tokens", type=int, help="tokens per stream (default 100)")
    parser.add_argument("--interval", type=float, help="seconds between tokens (default 0.005)")
    parser.add_argument(
        "--only",
        help="comma-separated configuration keys to run (the no-handler baseline always runs): "
        + ", ".join(cfg.key for cfg in CONFIGS),
    )
    args = parser.parse_args(argv)
    c.quiet_logs(args.show_logs)
    only = _chosen(args.only)
    streams = args.streams or (20 if args.quick else 200)
    n_tokens = args.tokens or (30 if args.quick else 100)
    interval = args.interval if args.interval is not None else 0.005
    repeats = args.repeats or (1 if args.quick else 5)
    flush_timeout = 2.0
    lib = c.load_library()
    todo = [
        cfg
        for cfg in CONFIGS
        if (lib is not None or not cfg.hardened) and (only is None or cfg.key in only)
    ]
    model = PacedFakeChatModel(tokens=make_tokens(n_tokens), interval=interval)
    warm = PacedFakeChatModel(tokens=make_tokens(5), interval=0.001)
    t_start = time.perf_counter()

    runs: dict[str, list[LoadRun]] = {}

    for cfg in todo:  # warm-up
        run_isolated(lib, cfg, warm, min(streams, 20), flush_timeout)
    for rep in range(repeats):
        for cfg in todo if rep % 2 == 0 else todo[::-1]:  # alternate order against drift
            print(f"load: repeat {rep + 1}/{repeats} {cfg.key}", file=sys.stderr, flush=True)
            runs.setdefault(cfg.key, []).append(
                run_isolated(lib, cfg, model, streams, flush_timeout)
            )

    def tps(r: LoadRun) -> float:
        return r.tokens / (r.wall_ns / 1e9)

    def p99(r: LoadRun) -> float:
        return c.percentile(r.gaps_ns, 99) / 1e6

    def cpu_us(r: LoadRun) -> float:
        return r.cpu_ns / max(r.tokens, 1) / 1e3

    base_tps = c.median(tps(r) for r in runs["none"])
    base_p99 = c.median(p99(r) for r in runs["none"])
    base_cpu = c.median(cpu_us(r) for r in runs["none"])
    ideal_tps = streams / interval
    rows: list[list[str]] = []
    goal_rows: list[list[str]] = []
    summary: dict[str, tuple[float, float, float]] = {}  # key -> (tokens/s, p99 ms, CPU µs)
    for cfg in todo:
        rs = runs[cfg.key]
        t = c.median(tps(r) for r in rs)
        g = c.median(p99(r) for r in rs)
        cpu = c.median(cpu_us(r) for r in rs)
        summary[cfg.key] = (t, g, cpu)
        wall = c.median(r.wall_ns / 1e9 for r in rs)
        got = min(r.tokens for r in rs)
        errors = max(r.errors for r in rs)
        stats = "; ".join(s.summary() for s in rs[-1].settled) or "-"
        rows.append(
            [
                cfg.label,
                f"{got:,}/{streams * n_tokens:,}" + (f" ({errors} died)" if errors else ""),
                c.fmt_num(wall, 2),
                c.fmt_num(t, 0),
                c.fmt_ratio(c.ratio(t, base_tps)),
                c.fmt_num(c.median(c.percentile(r.gaps_ns, 50) / 1e6 for r in rs), 2),
                c.fmt_num(g, 2),
                c.fmt_ratio(c.ratio(g, base_p99)),
                c.fmt_num(cpu, 1),
                c.fmt_ratio(c.ratio(cpu, base_cpu)),
                stats,
            ]
        )
        if cfg.hardened:
            r_t = c.ratio(t, base_tps)
            r_g = c.ratio(g, base_p99)
            dropped = max(sum(s.stats.dropped for s in r.settled if s.stats) for r in rs)
            ok = c.shown(r_t) >= 0.9 and (cfg.backlog or dropped == 0)
            floor_tps = c.median(tps(r) for r in runs[cfg.floor]) if cfg.floor in runs else 0
            goal_rows.append(
                [
                    cfg.label,
                    c.fmt_ratio(r_t),
                    c.fmt_ratio(c.ratio(floor_tps, base_tps)) if floor_tps else "-",
                    c.fmt_ratio(c.ratio(t, floor_tps)) if floor_tps else "-",
                    c.fmt_ratio(r_g),
                    c.fmt_ratio(c.ratio(cpu, base_cpu)),
                    f"{dropped:,}" + (" (overloaded on purpose)" if cfg.backlog else ""),
                    c.verdict(ok),
                ]
            )
    versus_rows: list[list[str]] = []
    for alt_key, hard_key in VERSUS:
        if alt_key not in summary or hard_key not in summary:
            continue
        a_t, a_g, a_cpu = summary[alt_key]
        h_t, h_g, h_cpu = summary[hard_key]
        r_t, r_g, r_cpu = c.ratio(h_t, a_t), c.ratio(h_g, a_g), c.ratio(h_cpu, a_cpu)
        # The QueueHandler pattern is what a user writes instead: match it on all three.
        goal = c.shown(r_t) >= 1.0 and c.shown(r_cpu) <= 1.05 and c.shown(r_g) <= 1.1
        versus_rows.append(
            [
                next(x.label for x in todo if x.key == alt_key),
                next(x.label for x in todo if x.key == hard_key),
                f"{c.fmt_num(a_t, 0)} / {c.fmt_num(h_t, 0)} ({c.fmt_ratio(r_t)})",
                f"{c.fmt_num(a_g, 2)} / {c.fmt_num(h_g, 2)} ({c.fmt_ratio(r_g)})",
                f"{c.fmt_num(a_cpu, 1)} / {c.fmt_num(h_cpu, 1)} ({c.fmt_ratio(r_cpu)})",
                c.verdict(goal) if alt_key.startswith("diy_queue") else "-",
            ]
        )
    print("### Load: concurrent async streams sharing the same handlers\n")
    print(
        f"_{c.environment_line()}; {streams} concurrent `.astream()` calls of {n_tokens} "
        f"tokens, one every {interval * 1e3:g} ms (ideal {ideal_tps:,.0f} tokens/s); "
        f"medians of {repeats} runs; one handler instance shared by all streams. CPU = process"
        " CPU time of all threads from the start of the streams until every handler has"
        " delivered (hardened: `aflush()`, DIY: drained), per token received._\n"
    )
    print(
        c.md_table(
            [
                "handlers",
                "tokens received",
                "wall s",
                "tokens/s",
                "tokens/s vs none",
                "p50 gap ms",
                "p99 gap ms",
                "p99 vs none",
                "CPU µs/token (all threads, incl. delivery)",
                "CPU vs none",
                f"after the run (flush <= {flush_timeout:g} s; {flush_timeout / 2:g} s for"
                " the slow ones)",
            ],
            rows,
            right=(2, 3, 4, 5, 6, 7, 8, 9),
        )
    )
    share = base_tps / ideal_tps
    state = (
        "the loop is CPU-bound, so tokens/s measures CPU spent per token"
        if share < 0.9
        else "the loop keeps up, so tokens/s mostly measures added latency"
    )
    print(f"\n_Without handlers the streams reach {share:.0%} of the ideal rate: {state}._")
    if goal_rows:
        print(
            "\n#### Goal: hardened tokens/s >= 0.9x of no handler, no drops at the default"
            " `max_queue`\n"
        )
        print(
            c.md_table(
                [
                    "handlers",
                    "tokens/s vs none",
                    "floor (LangChain dispatching as many bare run_inline no-ops) vs none",
                    "tokens/s vs floor",
                    "p99 gap vs none",
                    "CPU/token vs none",
                    "dropped",
                    "goal",
                ],
                goal_rows,
                right=(1, 2, 3, 4, 5, 6),
            )
        )
    if versus_rows:
        print(
            "\n#### Hardened vs do it yourself under load (alternative / hardened, and the"
            " ratio hardened / alternative)\n"
        )
        print(
            "_Goal against the QueueHandler pattern: tokens/s >= 1.00x, p99 gap <= 1.10x,"
            " CPU/token <= 1.05x._\n"
        )
        print(
            c.md_table(
                [
                    "alternative",
                    "hardened",
                    "tokens/s",
                    "p99 gap ms",
                    "CPU µs/token",
                    "goal",
                ],
                versus_rows,
                right=(2, 3, 4),
            )
        )
    print(f"\n_load took {time.perf_counter() - t_start:.0f} s._\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
