"""``ThreadLane.nudge``: an emitter with a backlog hands the GIL to the worker, rarely and
never for a stuck handler.

Counted through the workers module's ``_sleep``: the nudge is the only place an emitter
sleeps, and a sleeping emitter is exactly what must stay rare.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManager

from safecallbacks import _workers, harden
from safecallbacks.testing import BlockingHandler


def _run(handler: Any) -> Any:
    manager = CallbackManager(handlers=[handler])
    return manager.on_chat_model_start({}, [[]], run_id=uuid.uuid4())[0]


@pytest.fixture
def emitter_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    real_sleep = time.sleep

    def counting_sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(_workers, "_sleep", counting_sleep)
    monkeypatch.setattr(_workers, "_LAST_NUDGE", [0.0])
    return slept


def test_a_backlog_nudges_the_worker_at_most_once_per_interval(
    emitter_sleeps: list[float],
) -> None:
    blocker = BlockingHandler()
    handler = harden(blocker, max_queue=100_000)
    run = _run(handler)
    run.on_llm_new_token("first")  # the worker parks in the handler: a backlog builds
    assert blocker.entered.wait(5.0)
    started = time.monotonic()
    for i in range(3_000):
        run.on_llm_new_token(f"t{i}")
    took = time.monotonic() - started
    blocker.release()
    assert handler.flush(10.0)
    assert emitter_sleeps, "a backlog of 3,000 events never nudged its worker"
    assert set(emitter_sleeps) == {_workers.NUDGE_SLEEP}
    # Once per NUDGE_AT more events queued, and never more often than NUDGE_EVERY.
    assert len(emitter_sleeps) <= min(3_000 // _workers.NUDGE_AT, took / _workers.NUDGE_EVERY + 1)
    assert handler.stats().delivered == 3_002  # the start event, "first", and the 3,000


def test_a_stuck_handler_is_never_nudged(emitter_sleeps: list[float]) -> None:
    blocker = BlockingHandler()
    handler = harden(blocker, max_queue=100_000, stall_threshold=0.05)
    run = _run(handler)
    run.on_llm_new_token("first")
    assert blocker.entered.wait(5.0)
    time.sleep(0.1)  # let the handler be busy past stall_threshold: stuck, not starved
    for i in range(3_000):
        run.on_llm_new_token(f"t{i}")
    blocker.release()
    assert handler.flush(10.0)
    assert emitter_sleeps == []


def test_a_short_queue_never_nudges(emitter_sleeps: list[float]) -> None:
    blocker = BlockingHandler()
    handler = harden(blocker)
    run = _run(handler)
    run.on_llm_new_token("first")
    assert blocker.entered.wait(5.0)
    for i in range(_workers.NUDGE_AT - 2):  # stays below the nudge depth
        run.on_llm_new_token(f"t{i}")
    blocker.release()
    assert handler.flush(10.0)
    assert emitter_sleeps == []
