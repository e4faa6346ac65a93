"""Load: 64 concurrent ``.astream()`` tasks and 4 threads running ``.stream()``, all sharing
three hardened handlers (sync recording, async recording, always failing). Over 100,000
events in total; every run must arrive complete and in order, and every event be counted.

Runs in the normal suite; sized to take well under a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import Any

import pytest

from safecallbacks import harden
from safecallbacks._paced import PacedFakeChatModel, make_tokens
from safecallbacks.testing import (
    AsyncRecordingHandler,
    FaultyHandler,
    RecordingHandler,
    assert_accounted,
)
from tests._offload_support import token_of

pytestmark = pytest.mark.timeout(180)

TASKS, STREAMS_PER_TASK = 64, 8
THREADS, STREAMS_PER_THREAD = 4, 40
CHUNKS = 100
PER_RUN = CHUNKS + 2  # on_chat_model_start, the chunks, on_llm_end
RUNS = TASKS * STREAMS_PER_TASK + THREADS * STREAMS_PER_THREAD
TOKENS = make_tokens(CHUNKS)
EXPECTED = [("on_chat_model_start", None)] + [("on_llm_new_token", t) for t in TOKENS]
EXPECTED.append(("on_llm_end", None))


def model() -> PacedFakeChatModel:
    return PacedFakeChatModel(tokens=TOKENS, interval=0)


def per_run(calls: list[Any]) -> dict[Any, list[tuple[str, str | None]]]:
    runs: dict[Any, list[tuple[str, str | None]]] = defaultdict(list)
    for call in calls:
        token = token_of(call) if call.hook == "on_llm_new_token" else None
        runs[call.run_id].append((call.hook, token))
    return runs


async def test_many_concurrent_streams_share_hardened_handlers() -> None:
    recording, arecording = RecordingHandler(), AsyncRecordingHandler()
    failing = FaultyHandler()
    room = RUNS * PER_RUN  # no drops: completeness can be checked exactly
    safes = [
        harden(recording, max_queue=room, breaker=None),
        harden(arecording, max_queue=room, breaker=None),
        harden(failing, breaker=None),
    ]
    config = {"callbacks": safes}
    errors: list[BaseException] = []
    started = time.monotonic()

    def sync_streams() -> None:
        try:
            for _ in range(STREAMS_PER_THREAD):
                chunks = [c.content for c in model().stream("hi", config=config)]
                assert chunks == TOKENS
        except BaseException as exc:
            errors.append(exc)

    async def async_streams() -> None:
        for _ in range(STREAMS_PER_TASK):
            chunks = []
            async for chunk in model().astream("hi", config=config):
                chunks.append(chunk.content)
                await asyncio.sleep(0)  # let the other 63 streams interleave
            assert chunks == TOKENS

    threads = [threading.Thread(target=sync_streams) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(async_streams() for _ in range(TASKS)))
    for thread in threads:
        await asyncio.to_thread(thread.join, 120)
    assert not errors, errors
    streamed = time.monotonic() - started

    for safe in safes:
        assert await safe.aflush(60), safe.stats()
    total = 0
    for safe in safes:
        stats = safe.stats()
        assert stats.emitted == RUNS * PER_RUN, stats
        assert stats.pending == 0 and stats.queue_depth == 0, stats
        assert_accounted(stats)
        total += stats.emitted
    assert total >= 100_000

    for handler in (recording, arecording):
        runs = per_run(list(handler.calls))
        assert len(runs) == RUNS
        broken = [run_id for run_id, seen in runs.items() if seen != EXPECTED]
        assert not broken, f"{len(broken)} runs out of order or incomplete"
        stats = safes[0 if handler is recording else 1].stats()
        assert stats.delivered == RUNS * PER_RUN and stats.dropped == 0, stats

    failed = safes[2].stats()
    assert failed.failed + failed.dropped == RUNS * PER_RUN, failed
    assert set(failed.errors) <= {"ValueError"}
    assert failing.calls == failed.failed
    # Not a benchmark; just keep an eye on it in the output of -rA / failures.
    print(f"streamed {total:,} events in {streamed:.1f} s")
