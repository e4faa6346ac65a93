"""What ``settle`` costs at the end of a call: from the last chunk to the call's return.

A paced stream (``--tokens`` tokens, one every ``--interval`` seconds), its consumer
timing two things per call: the time to the last chunk and the time from it to the
return (the root run's end, where an offloaded handler's backlog is waited for, up to
``settle``). Rows: no handler, and hardened offloaded handlers that keep up (a no-op, a
1 ms sink), one slower than the stream, and one hung for good (its first call waits the
bound, later ones none: it is then known to be stuck). Sync ``.stream()`` and async
``.astream()``; medians over ``--repeats`` calls, with the first call of the hung
handler apart.

    python benchmarks/settle.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

from _common import load_library, quiet_logs
from langchain_core.callbacks import BaseCallbackHandler

from safecallbacks._paced import PacedFakeChatModel, make_tokens


class Sink(BaseCallbackHandler):
    """Sleeps ``seconds`` per token: a write somewhere. ``None``: hangs until released."""

    def __init__(self, seconds: float | None, release: threading.Event) -> None:
        self.seconds, self.release = seconds, release

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        if self.seconds is None:
            self.release.wait(60)
        elif self.seconds:
            time.sleep(self.seconds)


def one_call(api: str, handler: Any, tokens: int, interval: float) -> tuple[float, float]:
    model = PacedFakeChatModel(tokens=make_tokens(tokens), interval=interval)
    config = {"callbacks": [handler] if handler is not None else []}
    started = time.perf_counter()
    last = started
    if api == "sync":
        for _ in model.stream("hi", config=config):
            last = time.perf_counter()
    else:

        async def drain() -> float:
            seen = started
            async for _ in model.astream("hi", config=config):
                seen = time.perf_counter()
            return seen

        last = asyncio.run(drain())
    return last - started, time.perf_counter() - last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.002)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 10, 2
    safecallbacks = load_library()
    assert safecallbacks is not None, "safecallbacks must be importable"
    quiet_logs()
    release = threading.Event()
    rows = [
        ("no handler", None),
        ("no-op, keeps up", 0.0),
        ("1 ms sink, keeps up", 0.001),
        (f"{args.interval * 2e3:g} ms sink, slower than the stream", args.interval * 2),
        ("hung", None),
    ]
    print(
        f"### settle: from the last chunk to the call's return, hardened handlers "
        f"({args.tokens} tokens, one every {args.interval * 1e3:g} ms, "
        f"medians of {args.repeats})\n"
    )
    print(
        "| handler | api | to last chunk | vs no handler | last chunk to return "
        "| first call (hung) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    floor: dict[str, float] = {}
    for label, seconds in rows:
        for api in ("sync", "async"):
            handler = None
            if label != "no handler":
                handler = safecallbacks.harden(Sink(seconds, release))
            results = [
                one_call(api, handler, args.tokens, args.interval) for _ in range(args.repeats)
            ]
            first = results[0][1] if label == "hung" else None
            rest = results[1:] if label == "hung" else results
            to_last = statistics.median(r[0] for r in rest)
            after = statistics.median(r[1] for r in rest)
            first_text = f"{first * 1e3:.1f} ms" if first is not None else ""
            floor.setdefault(api, to_last)
            print(
                f"| {label} | {api} | {to_last * 1e3:.1f} ms | {to_last / floor[api]:.2f}x "
                f"| {after * 1e3:.2f} ms | {first_text} |"
            )
            if handler is not None and label != "hung":
                safecallbacks.close(handler, timeout=5.0)
    release.set()


if __name__ == "__main__":
    main()
