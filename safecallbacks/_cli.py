"""The command line of ``python -m safecallbacks``: its parser and its dispatch.

Its one job is turning ``argv`` into a call of the demo or the check (``_demo``,
``_check``) and an exit code. None of it runs on the token path.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from . import __version__

__all__ = ["build_parser", "main"]


_DEMO_HELP = "stream through three misbehaving handlers, bare vs hardened (no network, <10 s)"
_DEMO_ABOUT = (
    "Stream a paced fake chat model (no network) through three misbehaving "
    "callback handlers: one raising with raise_error=True, one raising "
    "asyncio.CancelledError, one stalling once. Each runs bare, then hardened "
    "with safecallbacks.harden(); one table per handler shows what the consumer "
    "of each stream saw and what the hardened handler's stats() counted. "
    "Takes under 10 s with the defaults."
)
_CHECK_HELP = "grade your handler before production: python -m safecallbacks check module:Factory"


def _check_about() -> str:
    from ._check import RULE

    return (
        "Grade a callback handler before it meets production traffic. Imports MODULE, "
        "calls FACTORY() (a handler class, or a callable taking no arguments that "
        "returns a BaseCallbackHandler) afresh for every stream, and streams a paced "
        "fake model and a CPU-bound one through it with no handler, bare and hardened, "
        "with .stream() and .astream(). Reports the handler's time per event (p50/p99, "
        "each bare hook call timed in the caller), what it raised (per hook and error "
        "type), whether it blocked the event loop (a 1 ms ticker beside the bare "
        "async stream), the mode harden()'s auto picks for it, and each stream's "
        "chunks, ending, total time and longest gap. Every stream is bounded by "
        f"--timeout. Exit code: {RULE}."
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _token_count(text: str) -> int:
    value = int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"must be >= 4, got {text}")
    return value


def _add_pace(parser: argparse.ArgumentParser, tokens: int, what: str, interval: float) -> None:
    """``--tokens`` and ``--interval``: the size and pace of the fake model's stream."""
    parser.add_argument(
        "--tokens", type=_token_count, default=tokens, help=f"{what} (default: {tokens})"
    )
    _add_seconds(parser, "--interval", interval, "time between tokens, like a provider's pace")


def _add_seconds(parser: argparse.ArgumentParser, flag: str, default: float, what: str) -> None:
    help_text = f"{what}, in seconds (default: {default:g})"
    parser.add_argument(flag, type=_positive_float, default=default, help=help_text)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ._demo import SCENARIOS

    demo = commands.add_parser("demo", help=_DEMO_HELP, description=_DEMO_ABOUT)
    _add_pace(demo, 40, "tokens per stream", 0.02)
    _add_seconds(demo, "--stall", 2.0, "how long the stalling handler blocks")
    demo.add_argument(
        "--api",
        choices=("sync", "async"),
        default="sync",
        help="consume with .stream() (sync, default) or .astream() (async)",
    )
    demo.add_argument(
        "--show-logs",
        action="store_true",
        help="also print the log lines LangChain and safecallbacks write (to stderr); "
        "by default they are only counted",
    )
    demo.add_argument(
        "--only",
        nargs="+",
        choices=[s.key for s in SCENARIOS],
        metavar="HANDLER",
        help="run only these handlers: " + ", ".join(s.key for s in SCENARIOS),
    )


def _add_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser("check", help=_CHECK_HELP, description=_check_about())
    check.add_argument("target", metavar="MODULE:FACTORY", help="e.g. myapp.callbacks:AuditHandler")
    check.add_argument(
        "--json", action="store_true", help="print one JSON object (for CI) instead of text"
    )
    _add_pace(check, 60, "tokens of the paced stream (the CPU-bound one has as many)", 0.005)
    _add_seconds(
        check, "--timeout", 3.0, "how long one stream may take before it is reported stalled"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safecallbacks",
        description="safecallbacks: LangChain callback handlers that cannot break, "
        "stall or tax a stream.",
        epilog="Run 'python -m safecallbacks COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"safecallbacks {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(commands)
    _add_check(commands)
    return parser


def _check(args: argparse.Namespace, out: TextIO) -> int:
    from ._check import CheckConfig, TargetError, run_check
    from ._check_report import grade, render

    cfg = CheckConfig(tokens=args.tokens, interval=args.interval, timeout=args.timeout)
    try:
        runs = run_check(args.target, cfg)
    except TargetError as exc:
        if args.json:
            out.write(json.dumps({"target": args.target, "error": str(exc), "exit_code": 2}))
            out.write("\n")
        sys.stderr.write(f"safecallbacks check: {exc}\n")
        return 2
    report = grade(args.target, runs)
    out.write(json.dumps(report) + "\n" if args.json else render(report))
    out.flush()
    return int(report["exit_code"])


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from ._demo import DemoConfig, run_demo

    cfg = DemoConfig(
        tokens=args.tokens,
        interval=args.interval,
        stall=args.stall,
        api=args.api,
        show_logs=args.show_logs,
    )
    results = run_demo(cfg, out=out, only=args.only)
    intact = all(r.hardened.chunks == r.hardened.total and not r.hardened.died for r in results)
    if not intact:
        out.write("\nA hardened stream did not deliver every chunk: please report this.\n")
    return 0 if intact else 1


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``python -m safecallbacks``; returns the process exit code.

    Without a command it prints the usage and the commands, and returns 0.
    """
    sink = out if out is not None else sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args, sink)
    if args.command == "demo":
        return _demo(args, sink)
    sink.write(parser.format_help())
    return 0
