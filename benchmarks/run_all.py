"""Run every benchmark, print the combined Markdown report, write the gap plot.

Each benchmark runs in its own child process (so threads, loops and peak memory of one
do not leak into the next); their Markdown goes to stdout in order, progress to stderr.

    python benchmarks/run_all.py [--quick] [--plot benchmarks/results.png] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["hot_path", "paced_stream", "load", "memory", "settle", "shared_sink"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="smoke sizes for every script")
    parser.add_argument(
        "--plot",
        default=os.path.join(HERE, "results.png"),
        metavar="PNG",
        help="where paced_stream writes its plot ('' to skip)",
    )
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    parser.add_argument("--show-logs", action="store_true")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# safecallbacks benchmarks ({'quick' if args.quick else 'full'} run, {stamp})\n")
    print(
        "Every ratio compares with the no-handler baseline measured in the same run; "
        "numbers are medians over repeats. Hardened = `safecallbacks.harden(handler)`.\n"
    )
    failed: list[str] = []
    for name in args.only or SCRIPTS:
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py")]
        if args.quick:
            cmd.append("--quick")
        if args.show_logs:
            cmd.append("--show-logs")
        if name == "paced_stream" and args.plot:
            cmd += ["--plot", args.plot]
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        took = time.perf_counter() - t0
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            failed.append(name)
            print(f"\n**{name} failed with exit code {proc.returncode}** (see stderr)\n")
        print(f"run_all: {name} done in {took:.0f} s", file=sys.stderr, flush=True)
        sys.stdout.flush()
    print(f"_Total: {time.perf_counter() - started:.0f} s._")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
