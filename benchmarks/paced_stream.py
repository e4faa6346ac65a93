"""Streams at a provider's pace, with misbehaving handlers attached bare and hardened.

A ``PacedFakeChatModel`` sends a token every ``--interval`` seconds (5 ms by default) and
the consumer timestamps every chunk it receives. For each handler kind the stream runs
with the handler attached bare and hardened, through ``.stream()`` and ``.astream()``,
and everything is compared with a stream without any handler measured in the same run.

Second part: CPU-bound streams (no pauses) to show what the hardened hook costs when the
stream itself is the bottleneck: 4,000 chunks with no-op, raising and async handlers, and
a 600-word ``GenericFakeChatModel`` stream (~10 ms) with every handler kind. Besides wall
time it reports process CPU time (all threads) per chunk, counted until the hardened
handler has been flushed, so delivery on worker threads and loop tasks is included.

    python benchmarks/paced_stream.py [--quick] [--plot results.png]
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import _common as c
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

from safecallbacks.testing import PacedFakeChatModel, make_tokens


@dataclass(frozen=True)
class Sizes:
    tokens: int
    interval: float
    repeats: int
    hang_s: float
    sleep_s: float
    cpu_s: float
    cpu_tokens: int
    cpu_repeats: int
    cpu_words: int  # the short CPU-bound stream, every handler kind
    cpu_sleep_s: float  # its sleeping handlers (short: 1,200 events must drain per run)
    cpu_hang_s: float  # its "hangs once" handler


FULL = Sizes(
    tokens=200,
    interval=0.005,
    repeats=3,
    hang_s=2.0,
    sleep_s=0.002,
    cpu_s=0.001,
    cpu_tokens=4_000,
    cpu_repeats=7,
    cpu_words=600,
    cpu_sleep_s=0.0002,
    cpu_hang_s=0.3,
)
QUICK = Sizes(
    tokens=30,
    interval=0.002,
    repeats=1,
    hang_s=0.3,
    sleep_s=0.002,
    cpu_s=0.001,
    cpu_tokens=600,
    cpu_repeats=1,
    cpu_words=150,
    cpu_sleep_s=0.0002,
    cpu_hang_s=0.1,
)


@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    make: Callable[[Sizes, int, int], BaseCallbackHandler]  # (sizes, hang_at, cpu_loops)
    goal: bool = True  # subject to the "total <= 1.05x, p99 <= 1.2x" goal when hardened


KINDS: list[Kind] = [
    Kind("noop", "no-op (sync)", lambda s, h, cl: c.NoOp()),
    Kind("sleep", "sleeps 2 ms (sync)", lambda s, h, cl: c.Sleeper(s.sleep_s)),
    Kind("fail", "always raises", lambda s, h, cl: c.Failing()),
    Kind("hang", "hangs once", lambda s, h, cl: c.HangOnce(h, s.hang_s)),
    Kind("async_noop", "async no-op", lambda s, h, cl: c.AsyncNoOp()),
    Kind("async_sleep", "async sleeps 2 ms", lambda s, h, cl: c.AsyncSleeper(s.sleep_s)),
    Kind("cpu", "CPU-heavy (~1 ms Python)", lambda s, h, cl: c.CpuHeavy(cl), goal=False),
]
MODES = ("sync", "async")
WRAPS = ("bare", "hardened")


# --------------------------------------------------------------------------- running


def stream_sync(model: BaseChatModel, callbacks: list[Any]) -> c.StreamRun:
    gaps: list[int] = []
    error: str | None = None
    gc.collect()  # every run starts from the same GC state (untimed)
    cpu0 = time.process_time_ns()
    t0 = prev = time.perf_counter_ns()
    try:
        for _chunk in model.stream("hi", config={"callbacks": callbacks}):
            now = time.perf_counter_ns()
            gaps.append(now - prev)
            prev = now
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        error = type(exc).__name__
    return c.StreamRun(time.perf_counter_ns() - t0, gaps, len(gaps), error, cpu_start_ns=cpu0)


async def stream_async(model: BaseChatModel, callbacks: list[Any]) -> c.StreamRun:
    gaps: list[int] = []
    error: str | None = None
    gc.collect()  # every run starts from the same GC state (untimed)
    cpu0 = time.process_time_ns()
    t0 = prev = time.perf_counter_ns()
    try:
        async for _chunk in model.astream("hi", config={"callbacks": callbacks}):
            now = time.perf_counter_ns()
            gaps.append(now - prev)
            prev = now
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        error = type(exc).__name__
    return c.StreamRun(time.perf_counter_ns() - t0, gaps, len(gaps), error, cpu_start_ns=cpu0)


def _close(hardened: Any, settled: c.Settled) -> None:
    t0 = time.perf_counter()
    hardened.close(timeout=0.5)
    settled.close_ms = (time.perf_counter() - t0) * 1e3


async def asettle(hardened: Any, timeout: float) -> c.Settled:
    if hardened is None:
        return c.Settled()
    t0 = time.perf_counter()
    ok = bool(await hardened.aflush(timeout=timeout))
    cpu_done = time.process_time_ns()
    settled = c.Settled(
        flushed=ok,
        stats=hardened.stats(),
        flush_ms=(time.perf_counter() - t0) * 1e3,
        cpu_done_ns=cpu_done,
    )
    t0 = time.perf_counter()
    await hardened.aclose(timeout=0.5)
    settled.close_ms = (time.perf_counter() - t0) * 1e3
    return settled


def run_one_sync(
    lib: ModuleType | None,
    model: BaseChatModel,
    handler: Any,
    wrap: str,
    name: str,
    options: dict[str, Any] | None = None,
    after: Callable[[], None] | None = None,
) -> c.StreamRun:
    hardened = None
    if lib is not None and handler is not None and wrap in ("hardened", "paused"):
        hardened = lib.harden(handler, name=name, **(options or {}))
    callbacks = [] if handler is None else [hardened if hardened is not None else handler]
    run = stream_sync(model, callbacks)
    if after is not None:
        after()
    if hardened is not None:
        run.settled = c.settle(hardened, timeout=30.0, close=False)
        _close(hardened, run.settled)
    cpu_done = run.settled.cpu_done_ns or time.process_time_ns()
    run.cpu_ns = cpu_done - run.cpu_start_ns
    return run


async def run_one_async(
    lib: ModuleType | None,
    model: BaseChatModel,
    handler: Any,
    wrap: str,
    name: str,
    options: dict[str, Any] | None = None,
    after: Callable[[], None] | None = None,
) -> c.StreamRun:
    hardened = None
    if lib is not None and handler is not None and wrap in ("hardened", "paused"):
        hardened = lib.harden(handler, name=name, **(options or {}))
    callbacks = [] if handler is None else [hardened if hardened is not None else handler]
    run = await stream_async(model, callbacks)
    if after is not None:
        after()
    if hardened is not None:
        run.settled = await asettle(hardened, timeout=30.0)
    cpu_done = run.settled.cpu_done_ns or time.process_time_ns()
    run.cpu_ns = cpu_done - run.cpu_start_ns
    return run


Key = tuple[str, str, str]  # (mode, kind key, wrap)


def configs(lib: ModuleType | None) -> list[tuple[str, str]]:
    out = [("none", "none")]
    for kind in KINDS:
        for wrap in WRAPS:
            if wrap == "hardened" and lib is None:
                continue
            out.append((kind.key, wrap))
    return out


def measure_paced(
    lib: ModuleType | None, sizes: Sizes, progress: Callable[[str], None]
) -> dict[Key, list[c.StreamRun]]:
    kinds = {k.key: k for k in KINDS}
    cpu_loops = c.cpu_loops_for(sizes.cpu_s)
    hang_at = max(1, sizes.tokens // 4)
    model = PacedFakeChatModel(tokens=make_tokens(sizes.tokens), interval=sizes.interval)
    warm_model = PacedFakeChatModel(tokens=make_tokens(5), interval=0.001)
    todo = configs(lib)

    def handler_for(key: str, warm: bool) -> Any:
        if key == "none":
            return None
        return kinds[key].make(sizes, 10**9 if warm else hang_at, cpu_loops)

    # warm-up: every configuration once, on a short stream, no hang
    for key, wrap in todo:
        run_one_sync(lib, warm_model, handler_for(key, True), wrap, key)

    async def warm_async() -> None:
        for key, wrap in todo:
            await run_one_async(lib, warm_model, handler_for(key, True), wrap, key)

    asyncio.run(warm_async())

    results: dict[Key, list[c.StreamRun]] = {}
    for rep in range(sizes.repeats):
        progress(f"paced_stream: repeat {rep + 1}/{sizes.repeats} (.stream)")
        for key, wrap in todo if rep % 2 == 0 else todo[::-1]:  # alternate against drift
            run = run_one_sync(lib, model, handler_for(key, False), wrap, key)
            results.setdefault(("sync", key, wrap), []).append(run)

        async def one_async_round(order: list[tuple[str, str]]) -> None:
            for key, wrap in order:
                run = await run_one_async(lib, model, handler_for(key, False), wrap, key)
                results.setdefault(("async", key, wrap), []).append(run)

        progress(f"paced_stream: repeat {rep + 1}/{sizes.repeats} (.astream)")
        asyncio.run(one_async_round(todo if rep % 2 == 0 else todo[::-1]))
    return results


# --------------------------------------------------------------------------- reporting


@dataclass
class Summary:
    total_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    chunks: str
    stats: str
    slow_close: float


def summarize(runs: list[c.StreamRun], expected: int) -> Summary:
    chunks_min = min(r.chunks for r in runs)
    errors = sorted({r.error for r in runs if r.error})
    chunks = f"{chunks_min}/{expected}"
    if errors:
        chunks += " died: " + ", ".join(errors)
    last = runs[-1].settled
    return Summary(
        total_ms=c.median(r.total_ns / 1e6 for r in runs),
        p50_ms=c.median(r.gap_ms(50) for r in runs),
        p99_ms=c.median(r.gap_ms(99) for r in runs),
        max_ms=c.median(r.max_gap_ms for r in runs),
        chunks=chunks,
        stats=last.summary(),
        slow_close=max((r.settled.close_ms or 0.0) for r in runs),
    )


def paced_report(
    results: dict[Key, list[c.StreamRun]], sizes: Sizes, lib: ModuleType | None
) -> tuple[str, list[str]]:
    labels = {k.key: k.label for k in KINDS}
    goals = {k.key: k.goal for k in KINDS}
    out: list[str] = []
    goal_rows: list[list[str]] = []
    notes: list[str] = []
    headers = [
        "handler",
        "attached",
        "chunks",
        "total ms",
        "total vs none",
        "p50 gap ms",
        "p99 gap ms",
        "p99 vs none",
        "max gap ms",
        "hardened stats after flush",
    ]
    for mode in MODES:
        base = summarize(results[(mode, "none", "none")], sizes.tokens)
        rows: list[list[str]] = []
        for key, wrap in configs(lib):
            runs = results.get((mode, key, wrap))
            if not runs:
                continue
            s = summarize(runs, sizes.tokens)
            r_total = c.ratio(s.total_ms, base.total_ms)
            r_p99 = c.ratio(s.p99_ms, base.p99_ms)
            rows.append(
                [
                    labels.get(key, "(no handler)"),
                    wrap if key != "none" else "-",
                    s.chunks,
                    c.fmt_num(s.total_ms),
                    c.fmt_ratio(r_total),
                    c.fmt_num(s.p50_ms, 2),
                    c.fmt_num(s.p99_ms, 2),
                    c.fmt_ratio(r_p99),
                    c.fmt_num(s.max_ms, 1),
                    s.stats,
                ]
            )
            if wrap == "hardened":
                if s.slow_close > 100:
                    notes.append(
                        f"close() of hardened {labels[key]} ({mode}) took up to "
                        f"{s.slow_close:.0f} ms after a successful flush"
                    )
                ok = None
                if goals[key]:
                    ok = (
                        c.shown(r_total) <= 1.05
                        and c.shown(r_p99) <= 1.2
                        and "died" not in s.chunks
                    )
                goal_rows.append(
                    [
                        f"`.{'stream' if mode == 'sync' else 'astream'}()`",
                        labels[key],
                        c.fmt_ratio(r_total),
                        c.fmt_ratio(r_p99),
                        verdict_or_excluded(ok, goals[key]),
                    ]
                )
        api = ".stream()" if mode == "sync" else ".astream()"
        out.append(
            f"#### `{api}`: {sizes.tokens} tokens, one every {sizes.interval * 1e3:g} ms"
            f" (medians of {sizes.repeats} runs)\n"
        )
        out.append(c.md_table(headers, rows, right=(3, 4, 5, 6, 7, 8)))
        out.append("")
    if goal_rows:
        out.append("#### Goal: hardened total <= 1.05x and p99 gap <= 1.2x of no handler\n")
        out.append(
            c.md_table(
                ["API", "handler (hardened)", "total vs none", "p99 vs none", "goal"],
                goal_rows,
                right=(2, 3),
            )
        )
        out.append("")
    return "\n".join(out), notes


def verdict_or_excluded(ok: bool | None, subject: bool) -> str:
    if not subject:
        return "excluded (GIL-bound by design)"
    return c.verdict(ok)


# --------------------------------------------------------------------------- CPU-bound


def cpu_models(sizes: Sizes) -> list[tuple[str, Callable[[], BaseChatModel]]]:
    words = max(1, (sizes.cpu_tokens + 1) // 2)  # GenericFakeChatModel splits on spaces
    text = " ".join(f"w{i}" for i in range(words))
    tokens = make_tokens(sizes.cpu_tokens)
    return [
        ("GenericFakeChatModel", lambda: GenericFakeChatModel(messages=iter([text]))),
        ("PacedFakeChatModel(interval=0)", lambda: PacedFakeChatModel(tokens=tokens, interval=0.0)),
    ]


CpuConfig = tuple[str, str, Callable[[], BaseCallbackHandler] | None]  # (wrap, label, make)

CPU_CONFIGS: list[CpuConfig] = [
    ("none", "(no handler)", None),
    ("bare", "no-op run_inline", c.NoOpInline),
    ("hardened", "no-op", c.NoOp),
    ("bare", "always raises", c.Failing),
    ("hardened", "always raises", c.Failing),
    ("bare", "async no-op", c.AsyncNoOp),
    ("hardened", "async no-op", c.AsyncNoOp),
    # diagnostic: the handler blocks on its first event until the stream ends, so the
    # stream pays only the recording side (no delivery competing for the GIL)
    ("paused", "no-op, delivery held until the end", None),
]


def cpu_goal(label: str, mode: str) -> float:
    """Targets of the 4,000-chunk stream: an async handler from sync code gets 1.4x."""
    return 1.4 if label == "async no-op" and mode == "sync" else 1.2


WORDS_GOAL = 1.3  # the 600-word stream: every handler kind, sync and async


def words_part(
    sizes: Sizes,
) -> tuple[str, list[tuple[str, Callable[[], BaseChatModel]]], list[CpuConfig]]:
    """The short CPU-bound stream and every handler kind of the paced part but CPU-heavy."""
    text = " ".join(f"w{i}" for i in range(sizes.cpu_words))
    chunks = 2 * sizes.cpu_words - 1  # words and the spaces between them
    kind_sizes = Sizes(
        **{**sizes.__dict__, "sleep_s": sizes.cpu_sleep_s, "hang_s": sizes.cpu_hang_s}
    )
    labels = {
        "sleep": f"sleeps {sizes.cpu_sleep_s * 1e3:g} ms (sync)",
        "async_sleep": f"async sleeps {sizes.cpu_sleep_s * 1e3:g} ms",
        "hang": f"hangs {sizes.cpu_hang_s:g} s once",
    }
    configs: list[CpuConfig] = [("none", "(no handler)", None)]
    for kind in KINDS:
        if not kind.goal:  # CPU-heavy: holds the GIL wherever it runs
            continue

        def make(kind: Kind = kind) -> BaseCallbackHandler:
            return kind.make(kind_sizes, max(1, chunks // 4), 0)

        for wrap in WRAPS:
            configs.append((wrap, labels.get(kind.key, kind.label), make))
    name = f"GenericFakeChatModel, {sizes.cpu_words} words"
    return name, [(name, lambda: GenericFakeChatModel(messages=iter([text])))], configs


def measure_cpu(
    lib: ModuleType | None, sizes: Sizes, progress: Callable[[str], None]
) -> tuple[str, list[list[str]]]:
    words_name, words_models, words_configs = words_part(sizes)
    parts = [
        (
            f"CPU-bound stream: {sizes.cpu_tokens:,} chunks, no pauses",
            cpu_models(sizes),
            CPU_CONFIGS,
            cpu_goal,
            "hardened total <= 1.2x of no handler (async handler from `.stream()`: <= 1.4x)",
        ),
        (
            f"CPU-bound stream: {words_name} ({2 * sizes.cpu_words - 1:,} chunks), every"
            " handler kind",
            words_models,
            words_configs,
            lambda label, mode: WORDS_GOAL,
            f"hardened total <= {WORDS_GOAL}x of no handler, every handler kind",
        ),
    ]
    text = ""
    all_goals: list[list[str]] = []
    for title, models, configs, goal_of, goal_title in parts:
        rows, goal_rows = measure_cpu_part(lib, sizes, progress, models, configs, goal_of)
        all_goals += goal_rows
        text += (
            f"#### {title} (medians of {sizes.cpu_repeats} runs)\n\n"
            + c.md_table(CPU_HEADERS, rows, right=(4, 5, 6, 7, 8, 9))
            + "\n"
        )
        if goal_rows:
            text += (
                f"\n#### Goal: {goal_title}\n\n"
                + c.md_table(
                    [
                        "model",
                        "API",
                        "handler (hardened)",
                        "total vs none",
                        "CPU/chunk vs none",
                        "target",
                        "goal (total)",
                    ],
                    goal_rows,
                    right=(3, 4),
                )
                + "\n\n"
            )
    return text, all_goals


CPU_HEADERS = [
    "model",
    "API",
    "handler",
    "attached",
    "chunks",
    "total ms",
    "µs/chunk",
    "total vs none",
    "CPU µs/chunk (all threads, incl. delivery)",
    "CPU vs none",
    "hardened stats after flush",
]


def measure_cpu_part(
    lib: ModuleType | None,
    sizes: Sizes,
    progress: Callable[[str], None],
    models: list[tuple[str, Callable[[], BaseChatModel]]],
    configs: list[CpuConfig],
    goal_of: Callable[[str, str], float],
) -> tuple[list[list[str]], list[list[str]]]:
    rows: list[list[str]] = []
    goal_rows: list[list[str]] = []
    todo = [cfg for cfg in configs if cfg[0] in ("none", "bare") or lib is not None]
    for model_name, make_model in models:
        for mode in MODES:
            progress(f"paced_stream: CPU-bound {model_name} {mode}")
            runs: dict[int, list[c.StreamRun]] = {}
            for rep in range(sizes.cpu_repeats + 1):  # first round is the warm-up
                order = list(enumerate(todo))
                for i, (wrap, _label, factory) in order if rep % 2 else order[::-1]:
                    handler: Any = factory() if factory else None
                    options: dict[str, Any] = {}
                    after: Callable[[], None] | None = None
                    if wrap == "paused":
                        release = threading.Event()
                        handler = c.Stuck(release)
                        options = {"max_queue": sizes.cpu_tokens + 100}
                        after = release.set
                    name = "cpu-bound"
                    if mode == "sync":
                        run = run_one_sync(lib, make_model(), handler, wrap, name, options, after)
                    else:
                        run = asyncio.run(
                            run_one_async(lib, make_model(), handler, wrap, name, options, after)
                        )
                    if rep:
                        runs.setdefault(i, []).append(run)
            base = c.median(r.total_ns / 1e6 for r in runs[0])
            base_cpu = c.median(r.cpu_us_per_chunk() for r in runs[0])
            for i, (wrap, label, _f) in enumerate(todo):
                total = c.median(r.total_ns / 1e6 for r in runs[i])
                cpu = c.median(r.cpu_us_per_chunk() for r in runs[i])
                chunks = min(r.chunks for r in runs[i])
                r_total = c.ratio(total, base)
                r_cpu = c.ratio(cpu, base_cpu)
                api = "`.stream()`" if mode == "sync" else "`.astream()`"
                rows.append(
                    [
                        model_name,
                        api,
                        label,
                        wrap if i else "-",
                        str(chunks),
                        c.fmt_num(total),
                        c.fmt_num(total * 1e6 / max(chunks, 1) / 1e3, 1),
                        c.fmt_ratio(r_total),
                        c.fmt_num(cpu, 1),
                        c.fmt_ratio(r_cpu),
                        runs[i][-1].settled.summary(),
                    ]
                )
                if wrap == "hardened":
                    target = goal_of(label, mode)
                    goal_rows.append(
                        [
                            model_name,
                            api,
                            label,
                            c.fmt_ratio(r_total),
                            c.fmt_ratio(r_cpu),
                            f"<= {target:g}x",
                            c.verdict(c.shown(r_total) <= target),
                        ]
                    )
    return rows, goal_rows


# --------------------------------------------------------------------------- plot


def plot(results: dict[Key, list[c.StreamRun]], path: str, sizes: Sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    styles = [
        ("none", "none", "no handler", "0.5"),
        ("hang", "bare", "bare", "tab:red"),
        ("hang", "hardened", "hardened", "tab:blue"),
    ]
    for row, mode in enumerate(MODES):
        api = ".stream()" if mode == "sync" else ".astream()"
        ax_t, ax_c = axes[row]
        for key, wrap, label, color in styles:
            runs = results.get((mode, key, wrap))
            if not runs:
                continue
            gaps = [g / 1e6 for g in runs[-1].gaps_ns]
            ax_t.plot(range(len(gaps)), gaps, label=label, color=color, lw=1)
            data = sorted(gaps)
            ys = [(len(data) - i) / len(data) for i in range(len(data))]  # share of gaps >= x
            ax_c.step(data, ys, where="post", label=label, color=color)
        ax_t.set_yscale("log")
        ax_t.set_xlabel("token index")
        ax_t.set_ylabel("gap before token (ms)")
        ax_t.set_title(f"{api}: handler hangs {sizes.hang_s:g} s once")
        ax_t.legend()
        ax_c.set_xscale("log")
        ax_c.set_yscale("log")
        ax_c.set_xlabel("inter-token gap seen by the consumer (ms)")
        ax_c.set_ylabel("share of gaps >= x")
        ax_c.set_title(f"{api}: gap distribution (tail, log-log)")
        ax_c.legend(loc="upper right")
    fig.suptitle(
        f"PacedFakeChatModel, {sizes.tokens} tokens every "
        f"{sizes.interval * 1e3:g} ms: bare vs hardened stalling handler"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else "paced stream")
    parser.add_argument("--tokens", type=int, help="tokens per paced stream")
    parser.add_argument("--interval", type=float, help="seconds between tokens")
    parser.add_argument("--plot", metavar="PNG", help="write the stalling-handler gap plot")
    parser.add_argument("--skip-cpu-bound", action="store_true")
    args = parser.parse_args(argv)
    c.quiet_logs(args.show_logs)
    sizes = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.tokens:
        overrides["tokens"] = args.tokens
    if args.interval is not None:
        overrides["interval"] = args.interval
    if args.repeats:
        overrides["repeats"] = args.repeats
        overrides["cpu_repeats"] = args.repeats
    if overrides:
        sizes = Sizes(**{**sizes.__dict__, **overrides})
    lib = c.load_library()

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = measure_paced(lib, sizes, progress)
    text, notes = paced_report(results, sizes, lib)
    print("### Paced stream: per-token gaps and total time, bare vs hardened\n")
    print(
        f"_{c.environment_line()}; hardened = `safecallbacks.harden(handler)` with defaults;"
        " a fresh handler per run; gaps include the time to the first token._\n"
    )
    print(text)
    if not args.skip_cpu_bound:
        cpu_text, _ = measure_cpu(lib, sizes, progress)
        print(cpu_text)
    for note in notes:
        print(f"- note: {note}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("\n_Plot skipped: matplotlib is not installed (`pip install -e '.[bench]'`)._")
    elif args.plot:
        plot(results, args.plot, sizes)
        print(f"\n_Plot of the stalling handler's gaps written to `{args.plot}`._")
    print(f"\n_paced_stream took {time.perf_counter() - t0:.0f} s._\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
