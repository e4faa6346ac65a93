"""One slow handler (a "sink") shared by many concurrent streams: does it keep up?

A sink takes milliseconds per token (a write to a socket, a file, a queue broker). One
instance of it is shared by every request, as a module-level logging or tracing handler
is. Two scenarios, each run with no handler, the sink bare (sync and async) and the sink
hardened with ``safecallbacks.harden()`` (sync and async):

- A: ``--streams`` (120) concurrent ``PacedFakeChatModel.astream()`` calls on one event
  loop, ``--tokens`` (100) tokens each, one every ``--interval`` (10 ms);
- B: ``--threads`` (32) threads each calling ``.stream()`` on the same model (``time.sleep``
  pacing).

The sync sink sleeps ``--sink-ms`` (2 ms) in ``on_llm_new_token``, the async one awaits
``asyncio.sleep`` as long. Both record, per run, every event they get (start, tokens, end)
and when they got it. The model stamps each token's emission time just before it hands
the token to the run manager, so the lag of a token is its delivery time minus its
emission time. Reported per configuration: the streams' wall time (all started to the
last one finished) and its ratio to no handler, events emitted / delivered / dropped, lag
p50 / p99, the time from the last stream's end until ``flush()`` / ``aflush()`` returned
("backlog gone after") and the runs the sink saw complete (start, every token, end) and
in order.

Two *floors* show what moving the sink off the stream costs at the least, with none of
the guarantees: the sync sink called by 32 threads reading one ``queue.Queue`` that a
``run_inline`` handler fills, and (A only) the async sink started as one task per event on
the emitting loop. Where a floor is itself above the 1.15x goal, the goal is out of reach
for any dispatch on this machine: the sink's own cost lands on the streams' cores.

    python benchmarks/shared_sink.py [--quick] [--max-concurrency N]
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import _common as c
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
)
from langchain_core.outputs import ChatGenerationChunk
from pydantic import ConfigDict

from safecallbacks.testing import PacedFakeChatModel, make_tokens

WORD = "tok"  # make_tokens(n, WORD): "tok0", " tok1", ... so a token names its own index


def token_index(token: Any) -> int:
    return int(str(token).lstrip()[len(WORD) :])


# --------------------------------------------------------------------------- emission times


class Stamps:
    """``id(chunk)`` -> ``time.monotonic()`` when the model produced the chunk.

    LangChain (1.x) calls the handlers with ``chunk=`` the very object the model yielded,
    right after the yield: a sink looks its chunk up when it is delivered. The chunk is
    alive until then (the event holds it), so no other chunk can have reused its id.
    """

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def lag(self, chunk: Any) -> float | None:
        emitted = self.at.get(id(chunk))
        return None if emitted is None else time.monotonic() - emitted


class StampingModel(PacedFakeChatModel):
    """``PacedFakeChatModel`` that stamps every chunk as it is produced (the same cost with
    or without handlers, so the no-handler baseline pays it too)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    stamps: Stamps

    def _chunk(self, index: int) -> ChatGenerationChunk:
        # called once per token, after the pause and right before the token is emitted
        chunk = super()._chunk(index)
        self.stamps.at[id(chunk)] = time.monotonic()
        return chunk


# --------------------------------------------------------------------------- the sinks


class Record:
    """What a sink received, per run: (kind, token index or -1, lag in seconds or None)."""

    def __init__(self, stamps: Stamps) -> None:
        self.stamps = stamps
        self.lock = threading.Lock()
        self.runs: dict[uuid.UUID, list[tuple[str, int, float | None]]] = {}
        self.count = 0

    def add(self, run_id: uuid.UUID, kind: str) -> None:
        with self.lock:
            self.runs.setdefault(run_id, []).append((kind, -1, None))
            self.count += 1

    def token(self, run_id: uuid.UUID, token: Any, chunk: Any) -> None:
        lag = self.stamps.lag(chunk)  # delivery time minus emission time
        with self.lock:
            self.runs.setdefault(run_id, []).append(("token", token_index(token), lag))
            self.count += 1


class SyncSink(BaseCallbackHandler):
    """Blocking I/O per token (``time.sleep``); ``run_inline`` left at LangChain's default."""

    def __init__(self, seconds: float, stamps: Stamps) -> None:
        self.seconds = seconds
        self.record = Record(stamps)

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: uuid.UUID, **kwargs: Any
    ) -> None:
        self.record.add(run_id, "start")

    def on_llm_start(
        self, serialized: Any, prompts: Any, *, run_id: uuid.UUID, **kwargs: Any
    ) -> None:
        self.record.add(run_id, "start")

    def on_llm_new_token(
        self, token: Any, *, run_id: uuid.UUID, chunk: Any = None, **kwargs: Any
    ) -> None:
        self.record.token(run_id, token, chunk)
        time.sleep(self.seconds)

    def on_llm_end(self, response: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self.record.add(run_id, "end")

    def on_llm_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self.record.add(run_id, "error")


class AsyncSink(AsyncCallbackHandler):
    """Async I/O per token (``await asyncio.sleep``)."""

    def __init__(self, seconds: float, stamps: Stamps) -> None:
        self.seconds = seconds
        self.record = Record(stamps)

    async def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: uuid.UUID, **kwargs: Any
    ) -> None:
        self.record.add(run_id, "start")

    async def on_llm_start(
        self, serialized: Any, prompts: Any, *, run_id: uuid.UUID, **kwargs: Any
    ) -> None:
        self.record.add(run_id, "start")

    async def on_llm_new_token(
        self, token: Any, *, run_id: uuid.UUID, chunk: Any = None, **kwargs: Any
    ) -> None:
        self.record.token(run_id, token, chunk)
        await asyncio.sleep(self.seconds)

    async def on_llm_end(self, response: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self.record.add(run_id, "end")

    async def on_llm_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self.record.add(run_id, "error")


# --------------------------------------------------------------------------- floors


class ThreadFloor(BaseCallbackHandler):
    """What any hand-off to threads costs, at least: a ``run_inline`` handler that puts each
    event on a ``queue.Queue`` read by ``workers`` threads that call the sink. No isolation,
    no bound, no accounting, no order within a run: a floor, not an alternative."""

    run_inline = True

    def __init__(self, sink: SyncSink, workers: int) -> None:
        self.sink = sink
        self.record = sink.record
        self.queue: queue.Queue[tuple[str, tuple[Any, ...], dict[str, Any]] | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._work, daemon=True, name=f"floor-{i}")
            for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                hook, args, kwargs = item
                getattr(self.sink, hook)(*args, **kwargs)
            finally:
                self.queue.task_done()

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.queue.put(("on_chat_model_start", args, kwargs))

    def on_llm_new_token(self, *args: Any, **kwargs: Any) -> None:
        self.queue.put(("on_llm_new_token", args, kwargs))

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self.queue.put(("on_llm_end", args, kwargs))

    def drain(self) -> None:
        self.queue.join()
        for _ in self.threads:
            self.queue.put(None)


class TaskFloor(BaseCallbackHandler):
    """What delivering an async sink on the emitting loop costs, at least: a ``run_inline``
    handler that starts one task per event. No isolation, order, bound or accounting."""

    run_inline = True

    def __init__(self, sink: AsyncSink) -> None:
        self.sink = sink
        self.record = sink.record
        self.tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(getattr(self.sink, hook)(*args, **kwargs))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self._spawn("on_chat_model_start", args, kwargs)

    def on_llm_new_token(self, *args: Any, **kwargs: Any) -> None:
        self._spawn("on_llm_new_token", args, kwargs)

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self._spawn("on_llm_end", args, kwargs)

    async def adrain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))


FLOOR_WORKERS = 32  # as many threads as the hardened wrapper may use (max_concurrency)


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    sink: type[SyncSink] | type[AsyncSink] | None = None
    hardened: bool = False
    floor: bool = False  # the sink behind the least dispatch that moves it off the stream


CONFIGS = [
    Config("none", "no handler"),
    Config("bare_sync", "bare sync sink", SyncSink),
    Config("bare_async", "bare async sink", AsyncSink),
    Config("h_sync", "hardened sync sink", SyncSink, hardened=True),
    Config("h_async", "hardened async sink", AsyncSink, hardened=True),
    Config("floor_sync", "floor: sync sink on 32 threads", SyncSink, floor=True),
    Config("floor_async", "floor: async sink, a task per event", AsyncSink, floor=True),
]


@dataclass
class Sizes:
    concurrency: int  # streams (A) or threads (B)
    tokens: int
    interval: float
    sink_s: float
    flush_timeout: float


@dataclass
class Run:
    wall_s: float  # all streams started -> the last one finished
    stream_errors: int
    emitted: int
    delivered: int
    dropped: int
    lags_s: list[float]
    backlog_s: float | None  # the last stream finished -> flush returned (hardened only)
    flushed: bool | None
    runs_ok: int
    missing: int  # runs lacking their start, a token or their end (nothing out of order)
    disorder: int  # runs whose events arrived out of order
    mode: str = ""
    stats: Any = None
    last_chunk_s: float = 0.0  # all streams started -> the last chunk was consumed


def check_runs(record: Record, expected: int, tokens: int) -> tuple[int, int, int]:
    """(complete and in order, incomplete, out of order) over the ``expected`` runs."""
    ok = missing = disorder = 0
    want = list(range(tokens))
    with record.lock:
        runs = [list(events) for events in record.runs.values()]
    for events in runs:
        kinds = [kind for kind, _, _ in events]
        got = [index for kind, index, _ in events if kind == "token"]
        ordered = (
            got == sorted(got)
            and len(set(got)) == len(got)
            and kinds.count("start") <= 1
            and kinds.count("end") + kinds.count("error") <= 1
            and ("start" not in kinds or kinds.index("start") == 0)
            and (kinds[-1] in ("end", "error") or ("end" not in kinds and "error" not in kinds))
        )
        complete = kinds[:1] == ["start"] and kinds[-1:] == ["end"] and got == want
        if complete and ordered:
            ok += 1
        elif ordered:
            missing += 1
        else:
            disorder += 1
    missing += max(0, expected - len(runs))  # runs the sink never heard of
    return ok, missing, disorder


def lags(record: Record) -> list[float]:
    with record.lock:
        return [
            lag
            for events in record.runs.values()
            for kind, _, lag in events
            if kind == "token" and lag is not None
        ]


def make_handler(
    lib: ModuleType | None, cfg: Config, sizes: Sizes, stamps: Stamps, options: dict[str, Any]
) -> Any:
    if cfg.sink is None:
        return None
    sink = cfg.sink(sizes.sink_s, stamps)
    if cfg.floor:
        if isinstance(sink, SyncSink):
            return ThreadFloor(sink, FLOOR_WORKERS)
        return TaskFloor(sink)
    return lib.harden(sink, **options) if cfg.hardened and lib is not None else sink


def finish(
    cfg: Config,
    handler: Any,
    sizes: Sizes,
    wall_s: float,
    errors: int,
    backlog_s: float | None,
    flushed: bool | None,
) -> Run:
    if handler is None:
        return Run(wall_s, errors, 0, 0, 0, [], None, None, sizes.concurrency, 0, 0)
    record: Record = handler.record
    ok, missing, disorder = check_runs(record, sizes.concurrency, sizes.tokens)
    if cfg.hardened:
        s = handler.stats()
        emitted, delivered, dropped, mode = s.emitted, s.delivered, s.dropped, s.mode
    else:  # bare: LangChain hands the sink every event before the stream goes on
        s, emitted, delivered, dropped, mode = None, record.count, record.count, 0, ""
    return Run(
        wall_s,
        errors,
        emitted,
        delivered,
        dropped,
        lags(record),
        backlog_s,
        flushed,
        ok,
        missing,
        disorder,
        mode,
        s,
    )


# --------------------------------------------------------------------------- scenario A


async def _scenario_async(
    lib: ModuleType | None, cfg: Config, sizes: Sizes, options: dict[str, Any]
) -> Run:
    stamps = Stamps()
    model = StampingModel(
        tokens=make_tokens(sizes.tokens, WORD), interval=sizes.interval, stamps=stamps
    )
    handler = make_handler(lib, cfg, sizes, stamps, options)
    callbacks = [handler] if handler is not None else []
    ends: list[float] = []
    seen: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        chunk_at = 0.0
        try:
            async for _chunk in model.astream("hi", config={"callbacks": callbacks}):
                chunk_at = time.perf_counter()
        except Exception:
            errors += 1
        ends.append(time.perf_counter())
        seen.append(chunk_at)

    gc.collect()  # every run starts from the same GC state (untimed)
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(sizes.concurrency)))
    last = max(ends)
    backlog_s: float | None = None
    flushed: bool | None = None
    if cfg.hardened and lib is not None:
        flushed = bool(await lib.aflush(handler, timeout=sizes.flush_timeout))
        backlog_s = time.perf_counter() - last
    elif isinstance(handler, TaskFloor):
        await handler.adrain()
    elif isinstance(handler, ThreadFloor):
        await asyncio.to_thread(handler.drain)
    run = finish(cfg, handler, sizes, last - t0, errors, backlog_s, flushed)
    run.last_chunk_s = max(seen) - t0
    if cfg.hardened and lib is not None:
        await lib.aclose(handler, timeout=0.2)
    return run


def scenario_async(
    lib: ModuleType | None, cfg: Config, sizes: Sizes, options: dict[str, Any]
) -> Run:
    """One run on a fresh event loop (and a fresh default executor)."""
    return asyncio.run(_scenario_async(lib, cfg, sizes, options))


# --------------------------------------------------------------------------- scenario B


def scenario_threads(
    lib: ModuleType | None, cfg: Config, sizes: Sizes, options: dict[str, Any]
) -> Run:
    stamps = Stamps()
    model = StampingModel(
        tokens=make_tokens(sizes.tokens, WORD), interval=sizes.interval, stamps=stamps
    )
    handler = make_handler(lib, cfg, sizes, stamps, options)
    callbacks = [handler] if handler is not None else []
    ends: list[float] = []
    seen: list[float] = []
    errors: list[int] = []
    go = threading.Barrier(sizes.concurrency + 1)

    def one() -> None:
        go.wait()
        chunk_at = 0.0
        try:
            for _chunk in model.stream("hi", config={"callbacks": callbacks}):
                chunk_at = time.perf_counter()
        except Exception:
            errors.append(1)
        ends.append(time.perf_counter())
        seen.append(chunk_at)

    threads = [
        threading.Thread(target=one, name=f"stream-{i}", daemon=True)
        for i in range(sizes.concurrency)
    ]
    for t in threads:
        t.start()
    gc.collect()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    last = max(ends)
    backlog_s: float | None = None
    flushed: bool | None = None
    if cfg.hardened and lib is not None:
        flushed = bool(lib.flush(handler, timeout=sizes.flush_timeout))
        backlog_s = time.perf_counter() - last
    elif isinstance(handler, ThreadFloor):
        handler.drain()
    run = finish(cfg, handler, sizes, last - t0, len(errors), backlog_s, flushed)
    run.last_chunk_s = max(seen) - t0
    if cfg.hardened and lib is not None:
        lib.close(handler, timeout=0.2)
    return run


# --------------------------------------------------------------------------- report


@dataclass
class Scenario:
    key: str
    title: str
    what: str
    runner: Callable[[ModuleType | None, Config, Sizes, dict[str, Any]], Run]
    sizes: Sizes
    configs: list[Config] = field(default_factory=list)


def med(values: list[float]) -> float:
    return c.median(values)


def fmt_s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{c.fmt_num(value, digits)} s"


def report(scn: Scenario, runs: dict[str, list[Run]], repeats: int, note: str) -> None:
    sizes = scn.sizes
    base = med([r.wall_s for r in runs["none"]])
    rows: list[list[str]] = []
    modes: list[str] = []
    for cfg in scn.configs:
        rs = runs[cfg.key]
        wall = med([r.wall_s for r in rs])
        wall_ratio = c.ratio(wall, base)
        errors = max(r.stream_errors for r in rs)
        if cfg.sink is None:
            events = "-"
            lag50 = lag99 = "-"
            backlog = "-"
            complete = "-"
        else:
            emitted = int(med([r.emitted for r in rs]))
            delivered = int(med([r.delivered for r in rs]))
            dropped = int(med([r.dropped for r in rs]))
            events = f"{emitted:,} / {delivered:,} / {dropped:,}"
            p50 = med([c.percentile(r.lags_s, 50) for r in rs])
            p99 = med([c.percentile(r.lags_s, 99) for r in rs])
            lag50, lag99 = fmt_lag(p50), fmt_lag(p99)
            if cfg.hardened:
                gone = med([r.backlog_s for r in rs if r.backlog_s is not None])
                timed_out = sum(1 for r in rs if not r.flushed)
                backlog = fmt_s(gone) + (
                    f" (flush timed out in {timed_out}/{len(rs)})" if timed_out else " (True)"
                )
            else:
                backlog = "-"
            worst = min(rs, key=lambda r: r.runs_ok)
            complete = f"{worst.runs_ok}/{sizes.concurrency}"
            if worst.missing:
                complete += f" ({worst.missing} incomplete"
                complete += f", {worst.disorder} out of order)" if worst.disorder else ")"
            elif worst.disorder:
                complete += f" ({worst.disorder} out of order)"
        goal = "-"
        if cfg.hardened:
            misses: list[str] = []
            if c.shown(wall_ratio) > 1.15:
                misses.append(f"wall {c.fmt_ratio(wall_ratio)}")
            worst_drop = max(r.dropped for r in rs)
            if worst_drop:
                misses.append(f"{worst_drop:,} dropped")
            worst_ok = min(r.runs_ok for r in rs)
            if worst_ok < sizes.concurrency:
                misses.append(f"{sizes.concurrency - worst_ok} runs incomplete")
            gone = med([r.backlog_s for r in rs if r.backlog_s is not None])
            if not all(r.flushed for r in rs) or gone > 2.0:
                misses.append(f"backlog {c.fmt_num(gone, 1)} s")
            if errors:
                misses.append(f"{errors} streams died")
            goal = c.verdict(not misses) + (f": {', '.join(misses)}" if misses else "")
            modes.append(f"{cfg.label}: `{rs[-1].mode}`")
        rows.append(
            [
                cfg.label + (f" ({errors} streams died)" if errors else ""),
                c.fmt_num(wall, 2),
                c.fmt_ratio(wall_ratio),
                c.fmt_num(med([r.last_chunk_s for r in rs]), 2),
                events,
                lag50,
                lag99,
                backlog,
                complete,
                goal,
            ]
        )
    print(f"### Shared sink, {scn.title}\n")
    print(
        f"_{c.environment_line()}; {scn.what}, {sizes.tokens} tokens each, one every "
        f"{sizes.interval * 1e3:g} ms; ONE sink instance shared by all of them, "
        f"{sizes.sink_s * 1e3:g} ms per token; medians of {repeats} runs{note}._\n"
    )
    print(
        c.md_table(
            [
                "handler",
                "streams' wall s",
                "vs no handler",
                "to last chunk s",
                "events emitted / delivered / dropped",
                "lag p50",
                "lag p99",
                f"backlog gone after (flush <= {sizes.flush_timeout:g} s)",
                "runs complete & in order (worst run)",
                "goal",
            ],
            rows,
            right=(1, 2, 3, 4, 5, 6, 7),
        )
    )
    if modes:
        print(f"\n_Mode chosen by the hardened wrapper: {'; '.join(modes)}._")
    print()


def fmt_lag(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing delivered
        return "n/a"
    if seconds < 1.0:
        return f"{seconds * 1e3:,.1f} ms"
    return f"{seconds:,.2f} s"


# --------------------------------------------------------------------------- main


def supports(lib: ModuleType | None, option: str) -> bool:
    if lib is None:
        return False
    try:
        from safecallbacks._options import Options
    except ImportError:
        return False
    return option in {f.name for f in dataclasses.fields(Options)}


def main(argv: list[str] | None = None) -> int:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else "shared sink")
    parser.add_argument("--streams", type=int, help="concurrent .astream() calls (default 120)")
    parser.add_argument("--threads", type=int, help="threads calling .stream() (default 32)")
    parser.add_argument("--tokens", type=int, help="tokens per stream (default 100)")
    parser.add_argument("--interval", type=float, help="seconds between tokens (default 0.01)")
    parser.add_argument(
        "--sink-ms", type=float, default=2.0, help="the sink's time per token (default 2 ms)"
    )
    parser.add_argument(
        "--flush-timeout", type=float, default=30.0, help="flush()/aflush() bound (default 30 s)"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="pass max_concurrency=N to harden() (only if the installed safecallbacks has it)",
    )
    parser.add_argument(
        "--only", choices=("async", "threads"), help="run one scenario only (default both)"
    )
    args = parser.parse_args(argv)
    c.quiet_logs(args.show_logs)
    repeats = args.repeats or (1 if args.quick else 3)
    tokens = args.tokens or (20 if args.quick else 100)
    interval = args.interval if args.interval is not None else 0.01
    sink_s = args.sink_ms / 1e3
    lib = c.load_library()

    options: dict[str, Any] = {}
    note = ""
    if args.max_concurrency is not None:
        if supports(lib, "max_concurrency"):
            options["max_concurrency"] = args.max_concurrency
            note = f"; hardened with `max_concurrency={args.max_concurrency}`"
        else:
            print(
                "note: the installed safecallbacks has no max_concurrency option; "
                "--max-concurrency ignored",
                file=sys.stderr,
            )
            note = "; `--max-concurrency` ignored (the installed safecallbacks has no such option)"
    if not options and not note:
        note = "; hardened with default options"

    configs = [cfg for cfg in CONFIGS if lib is not None or not cfg.hardened]
    scenarios = [
        Scenario(
            "async",
            "A: concurrent `.astream()` on one event loop",
            f"{args.streams or (20 if args.quick else 120)} concurrent `.astream()` calls on"
            " one event loop",
            scenario_async,
            Sizes(
                args.streams or (20 if args.quick else 120),
                tokens,
                interval,
                sink_s,
                args.flush_timeout,
            ),
            configs,
        ),
        Scenario(
            "threads",
            "B: threads calling `.stream()`",
            f"{args.threads or (8 if args.quick else 32)} threads each calling `.stream()`",
            scenario_threads,
            Sizes(
                args.threads or (8 if args.quick else 32),
                tokens,
                interval,
                sink_s,
                args.flush_timeout,
            ),
            [cfg for cfg in configs if cfg.key != "floor_async"],  # no loop to task on
        ),
    ]
    scenarios = [s for s in scenarios if args.only in (None, s.key)]
    t_start = time.perf_counter()

    for scn in scenarios:
        warm = Sizes(min(scn.sizes.concurrency, 4), 5, 0.001, sink_s, args.flush_timeout)
        for cfg in scn.configs:  # warm-up: every configuration once, tiny
            scn.runner(lib, cfg, warm, options)
        runs: dict[str, list[Run]] = {}
        for rep in range(repeats):
            order = scn.configs if rep % 2 == 0 else scn.configs[::-1]  # against drift
            for cfg in order:
                print(
                    f"shared_sink: {scn.key} repeat {rep + 1}/{repeats} {cfg.key}",
                    file=sys.stderr,
                    flush=True,
                )
                runs.setdefault(cfg.key, []).append(scn.runner(lib, cfg, scn.sizes, options))
        report(scn, runs, repeats, note)

    print(
        "_Streams' wall: from starting every request until the last call returned (a hardened"
        " handler's root run end may wait up to its `settle` option for that run's backlog);"
        " to last chunk: until the last chunk was consumed. "
        "Events: every hook call the sink gets (chat model start, each token, end); for "
        "hardened rows emitted / delivered / dropped come from `stats()`, for bare rows from "
        "the sink's own count (LangChain hands it every event before the stream goes on). "
        "Lag: the sink's `time.monotonic()` when a token's hook starts minus the model's when "
        "it emitted that token, over every delivered token of the run. Backlog gone after: "
        "from the last stream's end until `aflush()` (A) / `flush()` (B) returned, and whether "
        "it returned True. Goal (hardened rows): wall <= 1.15x no handler, 0 dropped, every "
        "run complete and in order, backlog gone <= 2 s; dropped and runs are judged on the "
        "worst repeat, the times on the medians._\n"
    )
    print(f"_shared_sink took {time.perf_counter() - t_start:.0f} s._\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
