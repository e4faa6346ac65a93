"""Guarantee 5, "everything is visible": stats, OpenTelemetry metrics, structlog logs, breaker."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

from safecallbacks import SafeHandler, harden
from safecallbacks.testing import (
    BlockingHandler,
    FakeClock,
    RecordingHandler,
    assert_accounted,
    fake_chat_model,
    use_clock,
    wait_until,
)


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    found = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[found])
    metrics.set_meter_provider(provider)
    if metrics.get_meter_provider() is not provider:
        pytest.skip("another meter provider was installed first in this process")
    return found


def _points(
    reader: InMemoryMetricReader, name: str, handler: str
) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    if attributes.get("handler") == handler:
                        found.append((attributes, point))
    return found


def _units(reader: InMemoryMetricReader) -> dict[str, str]:
    data = reader.get_metrics_data()
    return {
        metric.name: metric.unit
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def _llm_run(handler: BaseCallbackHandler) -> Any:
    manager = CallbackManager(handlers=[handler])
    return manager.on_chat_model_start({}, [[]], run_id=uuid.uuid4())[0]


# --- metrics ----------------------------------------------------------------------


def test_metric_names_units_attributes_and_values(reader: InMemoryMetricReader) -> None:
    class Flaky(SafeHandler):
        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            pass

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise ValueError("token sink down")

        def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
            pass

    handler = Flaky(name="m-flaky", breaker=(3, 3600.0))
    list(fake_chat_model(5).stream("hi", {"callbacks": [handler]}))  # 9 token events
    assert handler.flush(5.0)
    events = {
        (a["hook"], a["outcome"], a.get("error.type")): p.value
        for a, p in _points(reader, "safecallbacks.events", "m-flaky")
    }
    assert events == {
        ("on_chat_model_start", "delivered", None): 1,
        ("on_llm_new_token", "failed", "ValueError"): 3,
        ("on_llm_new_token", "skipped", None): 6,
        # The breaker is open, but the run it saw start still gets its end.
        ("on_llm_end", "delivered", None): 1,
    }
    durations = {
        a["hook"]: p.count for a, p in _points(reader, "safecallbacks.handler.duration", "m-flaky")
    }
    assert durations == {"on_chat_model_start": 1, "on_llm_new_token": 3, "on_llm_end": 1}
    (lag,) = _points(reader, "safecallbacks.delivery.lag", "m-flaky")
    assert lag[1].count == 5 and set(lag[0]) == {"handler"}
    changes = {
        a["state"]: p.value
        for a, p in _points(reader, "safecallbacks.breaker.state_changes", "m-flaky")
    }
    assert changes == {"open": 1}
    expected_units = {
        "safecallbacks.events": "{event}",
        "safecallbacks.handler.duration": "s",
        "safecallbacks.delivery.lag": "s",
        "safecallbacks.queue.depth": "{event}",
        "safecallbacks.breaker.state_changes": "{change}",
    }
    assert expected_units.items() <= _units(reader).items()
    stats = handler.stats()
    assert (stats.delivered, stats.failed, stats.skipped) == (2, 3, 6)
    assert stats.breaker == "open"


def test_histograms_sample_large_batches_while_the_event_counter_stays_exact(
    reader: InMemoryMetricReader,
) -> None:
    blocker = BlockingHandler()
    handler = harden(blocker, name="m-sampled")
    run = _llm_run(handler)
    run.on_llm_new_token("first")  # parks the worker: the rest pile up into one backlog
    assert blocker.entered.wait(5.0)
    for i in range(2_000):
        run.on_llm_new_token(f"t{i}")
    blocker.release()
    assert handler.flush(10.0)
    events = {a["hook"]: p.value for a, p in _points(reader, "safecallbacks.events", "m-sampled")}
    assert events == {"on_chat_model_start": 1, "on_llm_new_token": 2_001}
    durations = {
        a["hook"]: p.count
        for a, p in _points(reader, "safecallbacks.handler.duration", "m-sampled")
    }
    # Batches of at most 512 events, at most 32 values recorded from each.
    assert 32 <= durations["on_llm_new_token"] < 2_001
    (lag,) = _points(reader, "safecallbacks.delivery.lag", "m-sampled")
    assert lag[1].count == sum(durations.values())
    stats = handler.stats()
    assert stats.delivered == stats.handler_time.count == stats.lag.count == 2_002
    assert stats.lag.max >= stats.lag.p99 > 0


def test_queue_depths_of_handlers_sharing_a_name_add_up(reader: InMemoryMetricReader) -> None:
    """One handler per request, all named alike: the gauge shows their sum, not one of them."""
    warm = harden(RecordingHandler(), mode="offload", name="m-warm")
    list(fake_chat_model(2).stream("hi", {"callbacks": [warm]}))
    assert warm.flush(5.0)  # a committed batch: the instruments, the gauge among them, exist
    blockers = [BlockingHandler(), BlockingHandler()]
    safe = [harden(blocker, mode="offload", settle=0, name="m-shared") for blocker in blockers]
    try:
        for handler, blocker in zip(safe, blockers, strict=True):
            list(fake_chat_model(5).stream("hi", {"callbacks": [handler]}))
            assert blocker.entered.wait(5.0)
        depths = [handler.stats().queue_depth for handler in safe]
        assert all(depths)
        points = _points(reader, "safecallbacks.queue.depth", "m-shared")
        assert [p.value for _, p in points] == [sum(depths)]
    finally:
        for handler, blocker in zip(safe, blockers, strict=True):
            blocker.release()
            assert handler.flush(5.0)


def test_drops_and_queue_depth_are_reported(reader: InMemoryMetricReader) -> None:
    warm = harden(RecordingHandler(), name="m-drop-warm")
    list(fake_chat_model(2).stream("hi", {"callbacks": [warm]}))
    assert warm.flush(5.0)  # a committed batch: the instruments, the gauge among them, exist
    # Blocks on the run's start: a start is never shed, whereas a full queue may shed
    # every token before a busy machine's worker reaches one.
    blocker = BlockingHandler(hook="on_chat_model_start")
    safe = harden(blocker, max_queue=2, name="m-drop")
    model = fake_chat_model(10, replies=2)
    list(model.stream("hi", {"callbacks": [safe]}))
    assert blocker.entered.wait(5.0)
    list(model.stream("hi", {"callbacks": [safe]}))  # the handler is stuck: 2 queue, rest drop
    depth = {
        a["handler"]: p.value for a, p in _points(reader, "safecallbacks.queue.depth", "m-drop")
    }
    assert depth == {"m-drop": safe.stats().queue_depth} and depth["m-drop"] > 0
    blocker.release()
    assert safe.flush(5.0)
    stats = safe.stats()
    dropped = sum(
        p.value
        for a, p in _points(reader, "safecallbacks.events", "m-drop")
        if a["outcome"] == "dropped"
    )
    assert dropped == stats.dropped > 0
    assert_accounted(stats)


# --- logs ---------------------------------------------------------------------


def test_thousands_of_failures_log_one_entry_and_summaries() -> None:
    clock = FakeClock(step=0.01)  # each failure reading moves time on by 10 ms

    class Broken(SafeHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise ValueError("sink is down")

    handler = Broken(breaker=None, summary_interval=10.0)
    use_clock(handler, clock)
    with capture_logs() as logs:
        chunks = list(fake_chat_model(2500).stream("hi", {"callbacks": [handler]}))
        assert handler.flush(30.0)
    failures = [e for e in logs if e["event"] == "handler_failed"]
    summaries = [e for e in logs if e["event"] == "handler_failures_summary"]
    assert len(chunks) == 4999
    assert len(failures) == 1
    assert failures[0]["hook"] == "on_llm_new_token" and failures[0]["error_type"] == "ValueError"
    assert "on_llm_new_token" in failures[0]["traceback"]
    assert 4 <= len(summaries) <= 6  # 50 s of failures, one summary per 10 s, plus the flush
    assert 1 + sum(e["count"] for e in summaries) == 4999
    assert len(logs) < 10


def test_a_canary_in_prompt_and_tokens_never_reaches_logs_or_metrics(
    reader: InMemoryMetricReader,
) -> None:
    canary = "CANARY-7f3a"

    class Leaky(SafeHandler):
        def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
            raise ValueError(f"could not store {messages!r}")

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise ValueError(f"could not store {token}")

    model = fake_chat_model(0)
    model.messages = iter([f"{canary} {canary} {canary}"])

    def run(**options: Any) -> str:
        handler = Leaky(breaker=None, name=f"canary-{options}", **options)
        model.messages = iter([f"{canary} {canary}"])
        with capture_logs() as logs:
            list(model.stream(f"prompt {canary}", {"callbacks": [handler]}))
            assert handler.flush(5.0)
        attributes = [
            a for a, _ in _points(reader, "safecallbacks.events", handler.stats().handler)
        ]
        assert attributes
        assert canary not in repr(attributes)
        return repr(logs)

    assert canary not in run()
    assert canary in run(log_payloads=True)


def test_stall_report_names_the_handler_once_per_interval() -> None:
    class Slow(SafeHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            time.sleep(0.02)

    handler = Slow(stall_threshold=0.01, summary_interval=60.0, name="slowpoke")
    with capture_logs() as logs:
        list(fake_chat_model(5).stream("hi", {"callbacks": [handler]}))
        assert handler.flush(5.0)
    stalls = [e for e in logs if e["event"] == "handler_stalled"]
    assert len(stalls) == 1
    assert stalls[0]["handler"] == "slowpoke" and stalls[0]["hook"] == "on_llm_new_token"
    assert stalls[0]["duration_s"] >= 0.01


# --- breaker ---------------------------------------------------------------------


def test_breaker_closed_open_half_open_closed_and_open_again() -> None:
    clock = FakeClock()
    fail = [True]

    class Switch(SafeHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            if fail[0]:
                raise RuntimeError("down")

    handler = Switch(mode="inline", breaker=(2, 10.0))
    use_clock(handler, clock)
    run = _llm_run(handler)

    def emit(times: int = 1) -> None:
        for _ in range(times):
            run.on_llm_new_token("t")

    with capture_logs() as logs:
        emit(2)
        assert handler.stats().breaker == "open"
        emit(3)
        assert handler.stats().skipped == 3
        clock.advance(10.0)
        fail[0] = False
        emit()  # the trial succeeds
        assert handler.stats().breaker == "closed"
        fail[0] = True
        emit(2)
        assert handler.stats().breaker == "open"
        clock.advance(10.0)
        emit()  # the trial fails
        assert handler.stats().breaker == "open"
        emit()
    stats = handler.stats()
    assert (stats.delivered, stats.failed, stats.skipped) == (1, 5, 4)
    transitions = [e["state"] for e in logs if e["event"] == "breaker_state_changed"]
    assert transitions == ["open", "half_open", "closed", "open", "half_open", "open"]


# --- stats ------------------------------------------------------------------------


def test_stats_agree_with_metrics_and_invariant_under_concurrency(
    reader: InMemoryMetricReader,
) -> None:
    counter = itertools.count()

    class Sometimes(SafeHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            if next(counter) % 3 == 0:
                raise KeyError("every third")

    handler = Sometimes(breaker=None, name="m-concurrent")

    def stream() -> None:
        list(fake_chat_model(200).stream("hi", {"callbacks": [handler]}))

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
    assert handler.flush(30.0)
    stats = handler.stats()
    assert_accounted(stats)
    assert stats.emitted == 8 * 399
    assert stats.failed == stats.errors["KeyError"] == len(range(0, 8 * 399, 3))
    by_outcome: dict[str, int] = {}
    for attributes, point in _points(reader, "safecallbacks.events", "m-concurrent"):
        by_outcome[attributes["outcome"]] = by_outcome.get(attributes["outcome"], 0) + point.value
    assert by_outcome == {"delivered": stats.delivered, "failed": stats.failed}
    hook = stats.hooks["on_llm_new_token"]
    assert (hook.emitted, hook.delivered, hook.failed, hook.pending) == (
        stats.emitted,
        stats.delivered,
        stats.failed,
        0,
    )
    assert stats.handler_time.count == stats.lag.count == stats.emitted
    assert 0 <= stats.lag.p50 <= stats.lag.p99 <= stats.lag.max


def test_stats_is_frozen_and_readable() -> None:
    handler = harden(BlockingHandler(), name="repr-demo")
    handler.release()
    list(fake_chat_model(3).stream("hi", {"callbacks": [handler]}))
    assert handler.flush(5.0)
    stats = handler.stats()
    with pytest.raises(AttributeError):
        stats.emitted = 0  # type: ignore[misc]
    text = repr(stats)
    assert "handler='repr-demo'" in text and "emitted=7" in text and "delivered=7" in text
    assert "on_llm_new_token: 5/5" in text and "on_llm_end: 1/1" in text


def test_reading_stats_never_waits_for_a_stuck_handler() -> None:
    blocker = BlockingHandler()
    safe = harden(blocker, timeout=0.05)
    list(fake_chat_model(3).stream("hi", {"callbacks": [safe]}))
    assert blocker.entered.wait(5.0)
    assert wait_until(lambda: safe.stats().stuck, timeout=5.0)
    started = time.monotonic()
    stats = safe.stats()
    assert time.monotonic() - started < 0.5
    # Started, then stuck in the first token: 1 delivered, 1 in flight, the rest queued.
    assert (stats.emitted, stats.delivered, stats.pending, stats.queue_depth) == (7, 1, 6, 5)
    blocker.release()
    assert safe.flush(5.0)
    assert not safe.stats().stuck


def _iter_logs(logs: list[dict[str, Any]]) -> Iterator[str]:
    for entry in logs:
        yield repr(entry)


# --- readable logs ------------------------------------------------------------------------


class _Audit(BaseCallbackHandler):
    """Fails on every token, as a log sink that went away would."""

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        raise ValueError("sink is down")


def test_without_structlog_config_a_failure_is_one_readable_stdlib_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import structlog

    structlog.reset_defaults()  # as in an application that never configured it
    assert not structlog.is_configured()
    handler = harden(_Audit(), name="audit")
    with caplog.at_level("WARNING", logger="safecallbacks"):
        for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
            pass
        assert handler.flush(5.0)
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("handler_failed ")]
    assert (failed.name, failed.levelname) == ("safecallbacks", "ERROR")
    first, *stack = failed.getMessage().splitlines()
    assert first.startswith("handler_failed handler=audit hook=on_llm_new_token run_id=")
    assert first.endswith(" error_type=ValueError")
    assert stack[0] == "Handler stack (most recent call last):"
    assert any('raise ValueError("sink is down")' in line for line in stack), stack
    assert "\\n" not in failed.getMessage()  # real lines, not escapes
    messages = [r.getMessage() for r in caplog.records]
    summaries = [m for m in messages if m.startswith("handler_failures_summary ")]
    assert len(summaries) == 1 and "message='failed 4 more times in under 0.1 s'" in summaries[0]


def test_with_nothing_configured_the_line_names_its_level_and_logger(tmp_path: Any) -> None:
    from tests._child import run_child

    source = """
    from langchain_core.callbacks import BaseCallbackHandler
    from safecallbacks import flush, harden
    from safecallbacks.testing import fake_chat_model

    class Audit(BaseCallbackHandler):
        def on_llm_new_token(self, token, **kwargs):
            raise ValueError("sink is down")

    handler = harden(Audit())
    for _ in fake_chat_model(2).stream("hi", config={"callbacks": [handler]}):
        pass
    assert flush(handler, 5.0)
    """
    done = run_child(tmp_path, source)
    lines = done.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if "handler_failed" in line]
    assert len(starts) == 1, done.stderr
    assert lines[starts[0]].startswith("ERROR safecallbacks: handler_failed handler=Audit ")
    assert lines[starts[0] + 1] == "Handler stack (most recent call last):", done.stderr
    assert any('raise ValueError("sink is down")' in line for line in lines), done.stderr


@pytest.fixture
def structlog_with_contextvars() -> Iterator[list[dict[str, Any]]]:
    """structlog configured as an application would, merging bound contextvars."""
    import structlog

    seen: list[dict[str, Any]] = []

    def keep(_logger: Any, _method: str, event_dict: dict[str, Any]) -> Any:
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    try:
        yield seen
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


@pytest.mark.parametrize("mode", ["offload", "inline"])
@pytest.mark.parametrize("path", ["stream", "astream"])
async def test_the_callers_bound_context_is_on_its_failure_line(
    structlog_with_contextvars: list[dict[str, Any]], mode: str, path: str
) -> None:
    import asyncio

    import structlog

    from safecallbacks import aflush

    class AsyncAudit(BaseCallbackHandler):
        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise ValueError("sink is down")

    for make in (_Audit, AsyncAudit):
        handler = harden(make(), mode=mode, name=f"{make.__name__}-{mode}-{path}")

        def sync_request(handler: BaseCallbackHandler = handler) -> None:
            structlog.contextvars.bind_contextvars(request_id="req-7")
            for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
                pass

        async def async_request(handler: BaseCallbackHandler = handler) -> None:
            structlog.contextvars.bind_contextvars(request_id="req-7")
            async for _ in fake_chat_model(3).astream("hi", config={"callbacks": [handler]}):
                pass

        if path == "stream":  # a request served on a thread of its own, as a sync server does
            await asyncio.to_thread(sync_request)
        else:
            await asyncio.create_task(async_request())
        assert structlog.contextvars.get_contextvars() == {}  # not bound in this test's task
        assert await aflush(handler, 5.0)
        failed = [
            e
            for e in structlog_with_contextvars
            if e["event"] == "handler_failed" and e["handler"] == handler.stats().handler
        ]
        assert len(failed) == 1, structlog_with_contextvars
        assert failed[0].get("request_id") == "req-7", failed[0]


def test_events_after_close_are_logged_without_anyone_reading_stats() -> None:
    closed = harden(_Audit(), mode="offload", name="closed-audit")
    assert closed.flush(1.0)
    closed.close()
    busy = harden(BlockingHandler(hook="on_llm_end"), mode="offload")  # keeps workers busy
    try:
        with capture_logs() as logs:
            for _ in fake_chat_model(3).stream("hi", config={"callbacks": [closed, busy]}):
                pass
            assert wait_until(
                lambda: any(
                    e["event"] == "events_dropped" and e.get("handler") == "closed-audit"
                    for e in list(logs)
                ),
                10.0,
            ), logs
    finally:
        busy.release()
    dropped = [e for e in logs if e["event"] == "events_dropped"]
    assert dropped[0]["reason"] == "closed"


def test_events_after_close_are_logged_at_exit_at_the_latest(tmp_path: Any) -> None:
    from tests._child import run_child

    source = """
    from safecallbacks import close, harden
    from safecallbacks.testing import RecordingHandler, fake_chat_model

    handler = harden(RecordingHandler(), mode="offload", name="late-audit")
    close(handler)
    for _ in fake_chat_model(2).stream("hi", config={"callbacks": [handler]}):
        pass
    """
    done = run_child(tmp_path, source)
    lines = [line for line in done.stderr.splitlines() if "events_dropped " in line]
    assert len(lines) == 1 and "handler=late-audit" in lines[0] and "reason=closed" in lines[0]
