"""``StopStream`` in offload mode: raised by a delivered handler, it reaches the consumer of
the same run a bounded number of chunks later; other runs are not touched.

The streams are paced (``PacedFakeChatModel``: a chunk every few milliseconds, as a real
provider sends them), so "a few chunks later" is a meaningful bound and "never" would be
the whole stream.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
import structlog
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.runnables import RunnableLambda

from safecallbacks import StopStream, harden
from safecallbacks.testing import (
    PacedFakeChatModel,
    assert_accounted,
    fake_chat_model,
    make_tokens,
)
from tests._child import json_lines, output_of, run_child

pytestmark = pytest.mark.timeout(60)

TOKENS = make_tokens(200)
AT = 5  # the handler stops the run when it sees this token
INTERVAL = 0.01  # seconds between chunks
BOUND = 40  # further chunks the consumer may still get (0.4 s of slack on a loaded box)
KINDS = ["sync", "async"]


def paced(count: int = len(TOKENS)) -> PacedFakeChatModel:
    return PacedFakeChatModel(tokens=TOKENS[:count], interval=INTERVAL)


class Stopper(BaseCallbackHandler):
    """Stops the run tagged ``tag`` (any run if None) when token number ``AT`` arrives."""

    def __init__(self, tag: str | None = None, exc: BaseException | None = None) -> None:
        self.tag = tag
        self.exc = exc
        self.raised = threading.Event()
        self.seen: list[str] = []

    def check(self, token: str, kwargs: dict[str, Any]) -> None:
        self.seen.append(token)
        if token != TOKENS[AT]:
            return
        if self.tag is not None and self.tag not in (kwargs.get("tags") or ()):
            return
        self.raised.set()
        raise self.exc if self.exc is not None else StopStream("moderation hit")

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.check(token, kwargs)


class AsyncStopper(AsyncCallbackHandler):
    def __init__(self, tag: str | None = None, exc: BaseException | None = None) -> None:
        self.inner = Stopper(tag, exc)
        self.raised = self.inner.raised
        self.seen = self.inner.seen

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        self.inner.check(token, kwargs)


def stopper(kind: str, tag: str | None = None, exc: BaseException | None = None) -> Any:
    return Stopper(tag, exc) if kind == "sync" else AsyncStopper(tag, exc)


def check_stopped(got: list[str], error: BaseException | None) -> None:
    assert isinstance(error, StopStream), f"expected StopStream, got {error!r}"
    assert error.reason == "moderation hit"
    assert got == TOKENS[: len(got)], "chunks before the stop arrive intact and in order"
    assert len(got) >= AT + 1, "the stop cannot overtake the chunk that triggered it"
    assert len(got) <= AT + 1 + BOUND, f"stopped only after {len(got)} chunks"


def consume(model: Any, config: dict[str, Any]) -> tuple[list[str], BaseException | None]:
    got: list[str] = []
    try:
        for chunk in model.stream("hi", config=config):
            got.append(str(chunk.content))
    except StopStream as exc:
        return got, exc
    return got, None


async def aconsume(model: Any, config: dict[str, Any]) -> tuple[list[str], BaseException | None]:
    got: list[str] = []
    try:
        async for chunk in model.astream("hi", config=config):
            got.append(str(chunk.content))
    except StopStream as exc:
        return got, exc
    return got, None


# --------------------------------------------------------------------------------------------
# The run that raised is stopped, a few chunks later
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stream_stops_soon_after_an_offloaded_handler_raises(kind: str) -> None:
    handler = stopper(kind)
    safe = harden(handler)
    got, error = consume(paced(), {"callbacks": [safe]})
    check_stopped(got, error)
    assert handler.raised.is_set()
    assert safe.flush(5)
    assert_accounted(safe.stats())


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_stops_soon_after_an_offloaded_handler_raises(kind: str) -> None:
    handler = stopper(kind)
    safe = harden(handler)
    got, error = await aconsume(paced(), {"callbacks": [safe]})
    check_stopped(got, error)
    assert handler.raised.is_set()
    assert await safe.aflush(5)
    assert_accounted(safe.stats())


def test_stream_stop_is_not_counted_as_a_handler_failure() -> None:
    handler = Stopper()
    safe = harden(handler)
    consume(paced(), {"callbacks": [safe]})
    assert safe.flush(5)
    stats = safe.stats()
    assert stats.failed == 0 and not stats.errors, stats
    assert stats.breaker == "closed"


def test_stream_through_a_chain_stops_the_outer_run() -> None:
    """The handler sees the model's run; the consumer iterates the enclosing chain."""
    handler = Stopper()
    safe = harden(handler)
    chain = RunnableLambda(lambda text: text) | paced()
    got, error = consume(chain, {"callbacks": [safe]})
    check_stopped(got, error)


async def test_astream_through_a_chain_stops_the_outer_run() -> None:
    handler = AsyncStopper()
    safe = harden(handler)
    chain = RunnableLambda(lambda text: text) | paced()
    got, error = await aconsume(chain, {"callbacks": [safe]})
    check_stopped(got, error)


# --------------------------------------------------------------------------------------------
# Other runs carry on
# --------------------------------------------------------------------------------------------

OTHERS = 3
SHORT = 60  # tokens in each run, so the runs overlap for their whole length


@pytest.mark.parametrize("kind", KINDS)
def test_stream_stop_leaves_concurrent_runs_alone(kind: str) -> None:
    handler = stopper(kind, tag="stop-me")
    safe = harden(handler)
    tags = ["stop-me"] + [f"keep-{i}" for i in range(OTHERS)]
    outcomes: dict[str, tuple[list[str], BaseException | None]] = {}
    start = threading.Barrier(len(tags))

    def run(tag: str) -> None:
        start.wait(10)
        outcomes[tag] = consume(paced(SHORT), {"callbacks": [safe], "tags": [tag]})

    threads = [threading.Thread(target=run, args=(tag,)) for tag in tags]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    check_stopped(*outcomes["stop-me"])
    for tag in tags[1:]:
        got, error = outcomes[tag]
        assert error is None, f"{tag} was stopped too"
        assert got == TOKENS[:SHORT]
    assert safe.flush(5)
    assert_accounted(safe.stats())


@pytest.mark.parametrize("kind", KINDS)
async def test_astream_stop_leaves_concurrent_runs_alone(kind: str) -> None:
    handler = stopper(kind, tag="stop-me")
    safe = harden(handler)
    tags = ["stop-me"] + [f"keep-{i}" for i in range(OTHERS)]
    results = await asyncio.gather(
        *(aconsume(paced(SHORT), {"callbacks": [safe], "tags": [tag]}) for tag in tags)
    )
    outcomes = dict(zip(tags, results, strict=True))
    check_stopped(*outcomes["stop-me"])
    for tag in tags[1:]:
        got, error = outcomes[tag]
        assert error is None, f"{tag} was stopped too"
        assert got == TOKENS[:SHORT]
    assert await safe.aflush(5)
    assert_accounted(safe.stats())


@pytest.mark.parametrize("kind", KINDS)
def test_stream_after_a_stop_the_handler_serves_new_runs_normally(kind: str) -> None:
    handler = stopper(kind)
    safe = harden(handler)
    got, error = consume(paced(), {"callbacks": [safe]})
    check_stopped(got, error)
    # The same hardened handler on a later run that never triggers it: nothing is raised.
    model = fake_chat_model(20, replies=3)
    for _ in range(3):
        chunks = [str(c.content) for c in model.stream("hi", config={"callbacks": [safe]})]
        assert len(chunks) == 39
    assert safe.flush(5)
    assert_accounted(safe.stats())


# --------------------------------------------------------------------------------------------
# Only StopStream stops a run
# --------------------------------------------------------------------------------------------

NOT_A_STOP = [
    ValueError("plain failure"),
    asyncio.CancelledError(),
    KeyboardInterrupt(),
    SystemExit(3),
    GeneratorExit(),
]
# Raised from an async hook these two are special to asyncio (a task re-raises them out of
# its loop), so they are checked in a child interpreter below, never in pytest's own loops.
LOOP_KILLERS = (KeyboardInterrupt, SystemExit)


def in_process_cases() -> list[Any]:
    cases = []
    for kind in KINDS:
        for exc in NOT_A_STOP:
            if kind == "async" and isinstance(exc, LOOP_KILLERS):
                continue
            cases.append(pytest.param(kind, exc, id=f"{kind}-{type(exc).__name__}"))
    return cases


@pytest.mark.parametrize(("kind", "exc"), in_process_cases())
def test_stream_other_exceptions_from_an_offloaded_handler_do_not_stop(
    kind: str, exc: BaseException
) -> None:
    handler = stopper(kind, exc=exc)
    safe = harden(handler)
    got, error = consume(paced(AT + 10), {"callbacks": [safe]})
    assert error is None
    assert got == TOKENS[: AT + 10]
    assert safe.flush(5)
    assert handler.raised.is_set()
    stats = safe.stats()
    assert stats.failed == 1, stats
    assert_accounted(stats)


@pytest.mark.parametrize(("kind", "exc"), in_process_cases())
async def test_astream_other_exceptions_from_an_offloaded_handler_do_not_stop(
    kind: str, exc: BaseException
) -> None:
    handler = stopper(kind, exc=exc)
    safe = harden(handler)
    got, error = await aconsume(paced(AT + 10), {"callbacks": [safe]})
    assert error is None
    assert got == TOKENS[: AT + 10]
    assert await safe.aflush(5)
    assert handler.raised.is_set()
    stats = safe.stats()
    assert stats.failed == 1, stats
    assert_accounted(stats)


LOOP_KILLER_SCRIPT = """
import asyncio, itertools, json, os, sys
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from safecallbacks import harden
from safecallbacks.testing import AsyncRecordingHandler, PacedFakeChatModel, make_tokens

TOKENS = make_tokens(30)

def model():
    return PacedFakeChatModel(tokens=TOKENS, interval=0.005)

def case(exc_type, emitter, shape):
    class Raiser(AsyncCallbackHandler):
        async def on_llm_new_token(self, token, **kwargs):
            if token == TOKENS[3]:
                raise exc_type()

    class MixedRaiser(BaseCallbackHandler):
        # A sync handler with one async hook: awaited on a loop from a worker thread.
        async def on_llm_new_token(self, token, **kwargs):
            if token == TOKENS[3]:
                raise exc_type()

        def on_llm_end(self, response, **kwargs):
            pass

    out = {}
    safe = harden(Raiser() if shape == "async" else MixedRaiser())
    try:
        if emitter == "stream":
            out["chunks"] = len(list(model().stream("hi", config={"callbacks": [safe]})))
            out["flushed"] = safe.flush(2)
        else:
            async def main():
                chunks = [c async for c in model().astream("hi", config={"callbacks": [safe]})]
                return len(chunks), await safe.aflush(2)
            out["chunks"], out["flushed"] = asyncio.run(main())
    except BaseException as exc:
        out["escaped"] = repr(exc)
    out["failed"] = safe.stats().failed
    # An innocent async handler afterwards, from sync code (the shared background loop).
    innocent = AsyncRecordingHandler()
    other = harden(innocent)
    list(model().stream("hi", config={"callbacks": [other]}))
    out["innocent_flushed"] = other.flush(2)
    out["innocent_calls"] = len(innocent.calls)
    return out

# Each case in a forked child: it may wreck that process's loops, never the next case's.
for exc_type, emitter, shape in itertools.product(
    (KeyboardInterrupt, SystemExit), ("stream", "astream"), ("async", "mixed")
):
    pid = os.fork()
    if pid == 0:
        try:
            out = case(exc_type, emitter, shape)
        except BaseException as exc:
            out = {"crashed": repr(exc)}
        out["case"] = [exc_type.__name__, emitter, shape]
        print(json.dumps(out), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def loop_killer_results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Any]:
    directory = tmp_path_factory.mktemp("loop_killer")
    done = run_child(directory, LOOP_KILLER_SCRIPT, timeout=150, name="loop_killer.py", check=False)
    results = {}
    for out in json_lines(done):
        results[tuple(out.pop("case"))] = out
    assert len(results) == 8, output_of(done)
    return results


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("shape", ["async", "mixed"])
@pytest.mark.parametrize("emitter", ["stream", "astream"])
@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit"])
def test_async_hook_raising_keyboard_interrupt_or_system_exit_is_contained(
    loop_killer_results: dict[tuple[str, ...], Any], exc: str, emitter: str, shape: str
) -> None:
    """From an offloaded async hook, these are handler failures like any other: they must
    neither escape into the application's event loop nor kill the shared background loop."""
    out = loop_killer_results[(exc, emitter, shape)]
    assert "escaped" not in out and "crashed" not in out, out
    assert out["chunks"] == 30 and out["flushed"] is True, out
    assert out["failed"] == 1, out
    assert out["innocent_flushed"] is True and out["innocent_calls"] == 32, out


class LateCancel(AsyncCallbackHandler):
    """Awaits, then raises ``CancelledError`` of its own (say, from an inner timeout it
    mishandled) in ``on_chat_model_start``; records every token it is given."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[str]] = {}

    async def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError()

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        (tag,) = kwargs["tags"]
        self.tokens.setdefault(tag, []).append(token)


def unpaced(count: int) -> PacedFakeChatModel:
    """No pause: events pile up in the lane while the handler is still busy."""
    return PacedFakeChatModel(tokens=TOKENS[:count], interval=0)


def check_late_cancel(handler: LateCancel, safe: Any, tags: list[str], count: int) -> None:
    stats = safe.stats()
    assert stats.dropped == 0, stats  # the delivering loop was never going away
    assert stats.errors == {"CancelledError": len(tags)}, stats
    assert handler.tokens == dict.fromkeys(tags, TOKENS[:count]), handler.tokens
    assert_accounted(stats)


def test_stream_async_handler_cancelling_itself_after_a_suspension_loses_nothing() -> None:
    handler = LateCancel()
    safe = harden(handler, breaker=None)
    tags = ["first", "second"]
    outcomes: dict[str, Any] = {}

    def run(tag: str) -> None:
        outcomes[tag] = consume(unpaced(AT), {"callbacks": [safe], "tags": [tag]})

    threads = [threading.Thread(target=run, args=(tag,)) for tag in tags]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(outcomes[tag] == (TOKENS[:AT], None) for tag in tags), outcomes
    assert safe.flush(5)
    check_late_cancel(handler, safe, tags, AT)


async def test_astream_async_handler_cancelling_itself_after_a_suspension_loses_nothing() -> None:
    handler = LateCancel()
    safe = harden(handler, breaker=None)
    tags = ["first", "second"]
    results = await asyncio.gather(
        *(aconsume(unpaced(AT), {"callbacks": [safe], "tags": [tag]}) for tag in tags)
    )
    assert all(result == (TOKENS[:AT], None) for result in results), results
    assert await safe.aflush(5)
    check_late_cancel(handler, safe, tags, AT)


# --- stops that come too late ------------------------------------------------------------


class StopsAtEnd(BaseCallbackHandler):
    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        raise StopStream("moderation hit after the answer was complete")


class StopsAtFirstToken(BaseCallbackHandler):
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.raised = False

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.gate.wait(5)  # delivered only once the fast stream is over
        if not self.raised:
            self.raised = True
            raise StopStream("too slow to stop anything")


def _fast_path_on(handler: Any) -> bool:
    from safecallbacks._hardened import engine_of

    return engine_of(handler).fast_lane is not None


def test_a_stop_raised_by_a_runs_end_is_counted_too_late_and_leaves_no_mark() -> None:
    handler = harden(StopsAtEnd(), mode="offload")
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            chunks = list(fake_chat_model(5).stream("hi", config={"callbacks": [handler]}))
            assert len(chunks) == 9  # nothing left to stop
            assert handler.flush(5.0)
    stats = handler.stats()
    assert stats.stops_too_late == 3 and stats.failed == 0
    assert _fast_path_on(handler), "a stop mark outlived its run"
    assert [entry["event"] for entry in logs].count("stop_too_late") == 1


def test_an_offloaded_stop_that_arrives_after_the_run_is_counted_too_late() -> None:
    gate = threading.Event()
    handler = harden(StopsAtFirstToken(gate), mode="offload")
    chunks = list(fake_chat_model(5).stream("hi", config={"callbacks": [handler]}))
    gate.set()
    assert len(chunks) == 9
    assert handler.flush(5.0)
    stats = handler.stats()
    assert stats.stops_too_late == 1, stats
    assert _fast_path_on(handler)


class StreamingFake(PacedFakeChatModel):
    streaming: bool = True  # ainvoke streams, so on_llm_new_token is called


class StopAtOnce(BaseCallbackHandler):
    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        raise StopStream("enough")


async def test_ainvoke_turns_a_stop_into_an_attribute_error_as_the_readme_says() -> None:
    # Pins langchain-core's agenerate (docs/guarantees.md: "use astream"); if this starts to fail,
    # a stop reaches ainvoke as it is and the docs' advice can go.
    model = StreamingFake(tokens=TOKENS[:5], interval=0.0)
    with pytest.raises(AttributeError, match="'StopStream' object has no attribute"):
        await model.ainvoke("hi", config={"callbacks": [harden(StopAtOnce(), mode="inline")]})
    stopper = harden(StopAtOnce(), mode="inline")
    with pytest.raises(StopStream):
        async for _ in model.astream("hi", config={"callbacks": [stopper]}):
            pass
