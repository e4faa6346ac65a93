"""Memory held for a handler that is stuck forever, as a function of ``max_queue``.

A hardened handler whose ``on_llm_new_token`` blocks on an Event that is never set is fed
100,000 token events (each with its own chunk, as a real stream makes them) through
LangChain's run manager. Each configuration runs in a fresh child process, so peak RSS
(``VmHWM``) growth is its own. The child then closes the handler and exits without ever
releasing it; the parent also reports how long that exit took.

Reference rows: no handler at all (the chunks are created and discarded), and a bare
handler that keeps every event (what an unbounded queue in front of a stuck handler
would hold). A bare *stuck* handler cannot be measured: it blocks the stream forever.

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import _common as c
from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.outputs import ChatGenerationChunk

SETTINGS: list[tuple[str, int | None, str]] = [
    ("none", None, "-"),
    ("keep_all", None, "-"),
    ("stuck", 1_000, "drop_newest"),
    ("stuck", 10_000, "drop_newest"),
    ("stuck", 100_000, "drop_newest"),
    ("stuck", 10_000, "drop_oldest"),
]


class KeepAll(BaseCallbackHandler):
    run_inline = True

    def __init__(self) -> None:
        self.kept: list[tuple[c.Token, Any]] = []

    def on_llm_new_token(self, token: c.Token, **kwargs: Any) -> None:
        self.kept.append((token, kwargs))


def proc_status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(kind: str, max_queue: int | None, on_full: str, events: int) -> int:
    c.quiet_logs()
    lib = c.load_library()
    release = threading.Event()
    hardened: Any = None
    if kind == "none":
        callbacks: list[Any] = []
    elif kind == "keep_all":
        callbacks = [KeepAll()]
    else:
        if lib is None:
            print(json.dumps({"skipped": "safecallbacks not importable"}))
            return 0
        # warm the library's machinery (workers, imports) before the baseline reading
        warm = lib.harden(c.NoOp(), name="warm")
        warm.on_llm_new_token("warm", run_id=uuid.uuid4())
        warm.flush(timeout=5.0)
        warm.close(timeout=1.0)
        hardened = lib.harden(c.Stuck(release), max_queue=max_queue, on_full=on_full, name="stuck")
        callbacks = [hardened]
    manager = CallbackManager.configure(inheritable_callbacks=callbacks)
    run = manager.on_chat_model_start({"name": "memory_bench"}, [[HumanMessage("hi")]])[0]
    gc.collect()
    time.sleep(0.05)
    rss0 = proc_status_kb("VmRSS")
    peak_reset = reset_peak()
    hwm0 = proc_status_kb("VmHWM")
    t0 = time.perf_counter_ns()
    for i in range(events):
        token = f" tok{i}"
        run.on_llm_new_token(
            token, chunk=ChatGenerationChunk(message=AIMessageChunk(content=token))
        )
    emit_ns = (time.perf_counter_ns() - t0) / events
    gc.collect()
    out: dict[str, Any] = {
        "rss0_kb": rss0,
        "hwm0_kb": hwm0,
        "rss1_kb": proc_status_kb("VmRSS"),
        "hwm1_kb": proc_status_kb("VmHWM"),
        "peak_reset": peak_reset,
        "emit_ns": emit_ns,
    }
    if hardened is not None:
        out["flushed"] = bool(hardened.flush(timeout=0.2))
        s = hardened.stats()
        out["stats"] = {
            k: getattr(s, k)
            for k in ("emitted", "delivered", "failed", "dropped", "skipped", "pending")
        }
        t1 = time.perf_counter()
        hardened.close(timeout=0.5)
        out["close_s"] = time.perf_counter() - t1
        s = hardened.stats()
        out["after_close"] = {k: getattr(s, k) for k in ("dropped", "pending")}
    out["exit_start"] = time.time()
    print(json.dumps(out), flush=True)
    return 0  # the stuck handler is never released: interpreter exit must not hang


def main(argv: list[str] | None = None) -> int:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else "memory")
    parser.add_argument("--events", type=int, help="events fed to the stuck handler")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "MAX_QUEUE", "ON_FULL"), help=argparse_suppress()
    )
    args = parser.parse_args(argv)
    events = args.events or (10_000 if args.quick else 100_000)
    if args.child:
        kind, mq, on_full = args.child
        return child(kind, None if mq == "-" else int(mq), on_full, events)

    t_start = time.perf_counter()
    rows: list[list[str]] = []
    goal_rows: list[list[str]] = []
    notes: list[str] = []
    settings = [s for s in SETTINGS if not (args.quick and (s[1] or 0) > events)]
    for kind, mq, on_full in settings:
        print(f"memory: {kind} max_queue={mq} {on_full}", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--events",
            str(events),
            "--child",
            kind,
            "-" if mq is None else str(mq),
            on_full,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            rows.append([kind, str(mq), on_full] + ["TIMEOUT (exit hung?)"] + [""] * 5)
            continue
        t_end = time.time()
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append([kind, str(mq), on_full, f"child failed rc={proc.returncode}"] + [""] * 5)
            notes.append(proc.stderr.strip()[-500:])
            continue
        d = json.loads(lines[-1])
        if "skipped" in d:
            continue
        growth_mb = (d["hwm1_kb"] - (d["hwm0_kb"] if d["peak_reset"] else d["rss0_kb"])) / 1024
        kept_mb = (d["rss1_kb"] - d["rss0_kb"]) / 1024
        exit_s = t_end - d["exit_start"]
        label = {
            "none": "no handler",
            "keep_all": "bare handler keeping every event",
            "stuck": "hardened, handler stuck forever",
        }[kind]
        st = d.get("stats")
        stat_txt = "-"
        if st:
            stat_txt = (
                f"emitted {st['emitted']:,}, dropped {st['dropped']:,}, "
                f"pending {st['pending']:,}, delivered {st['delivered']:,}"
            )
        rows.append(
            [
                label,
                "-" if mq is None else f"{mq:,}",
                on_full,
                c.fmt_num(growth_mb, 1),
                c.fmt_num(kept_mb, 1),
                c.fmt_num(d["emit_ns"] / 1e3, 2),
                stat_txt,
                "-" if "close_s" not in d else f"{d['close_s']:.2f}",
                "-"
                if "after_close" not in d
                else "dropped {dropped:,}, pending {pending:,}".format(**d["after_close"]),
                f"{exit_s:.2f}",
            ]
        )
        if st and mq is not None:
            bounded = st["pending"] <= mq + 1  # +1: the event the handler is stuck on
            counted = st["emitted"] == (
                st["delivered"] + st["failed"] + st["dropped"] + st["skipped"] + st["pending"]
            )
            goal_rows.append(
                [
                    f"{mq:,} {on_full}",
                    f"{st['pending']:,}",
                    f"{st['dropped']:,}",
                    c.verdict(bounded),
                    c.verdict(counted),
                    f"{exit_s:.2f} s",
                ]
            )
    print(f"### Memory: a handler stuck forever, fed {events:,} events\n")
    print(
        f"_{c.environment_line()}; each row is a fresh process; peak growth = VmHWM after"
        " the events minus RSS before them; exit = time from the child's last line to its"
        " end (the stuck handler is never released)._\n"
    )
    print(
        c.md_table(
            [
                "handler",
                "max_queue",
                "on_full",
                "peak RSS growth MB",
                "RSS still held MB",
                "emit µs/event",
                "stats after feeding",
                "close(0.5) s",
                "after close()",
                "exit s",
            ],
            rows,
            right=(1, 3, 4, 5, 7, 9),
        )
    )
    if goal_rows:
        print(
            "\n#### Goal: held events bounded by max_queue, every drop counted, exit doesn't hang\n"
        )
        print(
            c.md_table(
                [
                    "max_queue / on_full",
                    "pending",
                    "dropped",
                    "bounded",
                    "emitted = sum of outcomes",
                    "exit took",
                ],
                goal_rows,
                right=(1, 2),
            )
        )
    for note in notes:
        print(f"\n- child error: `{note}`")
    print(f"\n_memory took {time.perf_counter() - t_start:.0f} s._\n")
    return 0


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
