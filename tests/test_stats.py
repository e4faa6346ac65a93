"""``Stats`` timings: exact count, mean and maximum; quantiles from a bounded, weighted sample.

Bucketing a value costs more than delivering a no-op event, so a large batch
is bucketed from one value per equal slice (``strata``). These tests pin what
stays exact and how close the sampled quantiles are; and that a snapshot taken
mid-stream is one snapshot: its totals are the sums of its per-hook rows.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from langchain_core.callbacks import BaseCallbackHandler

import safecallbacks
from safecallbacks import Stats
from safecallbacks._stats import SAMPLES_PER_BATCH, Estimator, strata
from safecallbacks.testing import fake_chat_model

durations = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
batches = st.lists(st.lists(durations, max_size=300), max_size=6)


@given(st.integers(min_value=0, max_value=5_000))
def test_strata_weights_cover_every_value_once(size: int) -> None:
    picked = strata(size)
    assert sum(weight for _, weight in picked) == size
    assert len(picked) == min(size, SAMPLES_PER_BATCH)
    positions = [position for position, _ in picked]
    assert positions == sorted(set(positions))
    assert all(0 <= position < size for position in positions)


@given(batches)
def test_count_total_and_max_are_exact_whatever_the_batch_size(parts: list[list[float]]) -> None:
    estimator = Estimator()
    for part in parts:
        estimator.add_many(part)
    every = [value for part in parts for value in part]
    assert estimator.count == len(every)
    assert math.isclose(estimator.total, sum(every), rel_tol=1e-9, abs_tol=1e-12)
    assert estimator.maximum == max(every, default=0.0)
    assert sum(estimator._buckets.values()) == len(every)  # weights make up the count
    summary = estimator.summary()
    assert summary.count == len(every)
    if every:
        assert summary.p50 <= summary.p99 <= summary.max == max(every)


@given(st.lists(durations, max_size=SAMPLES_PER_BATCH))
def test_a_small_batch_is_bucketed_value_by_value(values: list[float]) -> None:
    whole, one_by_one = Estimator(), Estimator()
    whole.add_many(values)
    for value in values:
        one_by_one.add(value)
    assert whole._buckets == one_by_one._buckets


@given(st.integers(min_value=SAMPLES_PER_BATCH + 1, max_value=2_000))
def test_sampled_quantiles_of_large_batches_keep_the_shape_of_the_stream(size: int) -> None:
    # A steady stream with every tenth event slow; slices of ten (size 320) must not
    # alias with it: the sample's positions are random within each slice.
    fast, slow = 20e-6, 5e-3
    values = [slow if i % 10 == 9 else fast for i in range(size)]
    estimator = Estimator()
    for _ in range(40):
        estimator.add_many(values)
    assert math.isclose(estimator.quantile(0.5), fast, rel_tol=0.1)
    assert math.isclose(estimator.quantile(0.99), slow, rel_tol=0.1)
    slow_weight = sum(count for index, count in estimator._buckets.items() if index > 150)
    slow_share = values.count(slow) / size
    assert abs(slow_weight / estimator.count - slow_share) < 0.03


class Busy(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += sum(range(200))  # a little work, so the queue is rarely empty


def disagreements(stats: Stats) -> list[str]:
    rows = stats.hooks.values()
    found = []
    for column in ("emitted", "delivered", "failed", "dropped", "skipped", "pending"):
        total, summed = getattr(stats, column), sum(getattr(row, column) for row in rows)
        if total != summed:
            found.append(f"{column}: total {total}, rows {summed}")
    outcomes = stats.delivered + stats.failed + stats.dropped + stats.skipped
    if stats.emitted != outcomes + stats.pending:
        found.append(f"emitted {stats.emitted} != outcomes {outcomes} + pending {stats.pending}")
    return found


def test_a_snapshot_taken_mid_stream_has_totals_equal_to_its_rows() -> None:
    handler = safecallbacks.harden(Busy(), mode="offload")
    done = threading.Event()

    def stream() -> None:
        try:
            for _ in range(30):
                list(fake_chat_model(40).stream("hi", config={"callbacks": [handler]}))
        finally:
            done.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    bad: list[list[str]] = []
    snapshots = 0
    while not done.is_set():
        snapshots += 1
        found = disagreements(safecallbacks.stats(handler))
        if found:
            bad.append(found)
    streamer.join(30.0)
    assert safecallbacks.flush(handler, 5.0)
    assert disagreements(safecallbacks.stats(handler)) == []
    assert snapshots > 10
    assert bad == [], f"{len(bad)} of {snapshots} snapshots disagree, first: {bad[:3]}"
