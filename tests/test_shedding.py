"""Guarantee 3, "nothing is lost silently": when a full queue must shed, tokens go first.

A handler's queue is bounded (``max_queue``). When it is full, events that neither start
nor end a run (tokens, text, retries, custom events) are dropped before any start, end or
error event, so a tracer never holds a run that was started and never ended: every run
whose start the handler received also gets its end or error, and a run whose start had to
be dropped gets none of its other events. Every drop is counted, per hook, and after a
successful flush ``emitted == delivered + failed + dropped + skipped`` with nothing pending.

The handler is held at its first delivery (it waits on an ``Event``), so the queue fills
up exactly while the runs are emitted; it is released once they are all done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig, RunnableLambda

import safecallbacks
from safecallbacks import harden
from safecallbacks.testing import (
    HOOKS,
    PacedFakeChatModel,
    assert_accounted,
    async_wait_until,
    make_tokens,
)

pytestmark = pytest.mark.timeout(60)

KINDS = ["sync", "async"]
PATHS = ["stream", "astream"]
DROPPING = ["drop_newest", "drop_oldest"]

START, TOKEN, END, ERROR = "on_chat_model_start", "on_llm_new_token", "on_llm_end", "on_llm_error"
BOUNDARIES = frozenset(h for h in HOOKS if h.endswith(("_start", "_end", "_error")))

MAX_QUEUE = 50
RUNS = 10
TOKENS = 20
EVENTS = RUNS * (TOKENS + 2)
GATE = 15.0  # a held handler lets go after this long whatever happens
FLUSH = 10.0


# --------------------------------------------------------------------------------------------
# Handlers held at their first delivery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Got:
    hook: str
    tag: str
    token: str | None


def got_of(hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Got:
    token = None
    if hook == TOKEN:
        token = str(kwargs["token"]) if "token" in kwargs else str(args[0])
    tags = kwargs.get("tags") or ["?"]
    return Got(hook, str(tags[0]), token)


class Held(BaseCallbackHandler):
    """Records every event; each delivery first waits for the gate, so the first one parks."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.lock = threading.Lock()
        self.got: list[Got] = []

    def release(self) -> None:
        self.gate.set()

    def take(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.entered.set()
        self.gate.wait(GATE)
        with self.lock:
            self.got.append(got_of(hook, args, kwargs))


class AsyncHeld(AsyncCallbackHandler):
    """The ``async def`` twin: parks without blocking its event loop."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.got: list[Got] = []

    def release(self) -> None:
        self.gate.set()

    async def take(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.entered.set()
        await async_wait_until(self.gate.is_set, GATE, interval=0.002)
        self.got.append(got_of(hook, args, kwargs))


def _held_hook(hook: str) -> Callable[..., None]:
    def take(self: Held, *args: Any, **kwargs: Any) -> None:
        self.take(hook, args, kwargs)

    take.__name__ = hook
    return take


def _async_held_hook(hook: str) -> Callable[..., Any]:
    async def take(self: AsyncHeld, *args: Any, **kwargs: Any) -> None:
        await self.take(hook, args, kwargs)

    take.__name__ = hook
    return take


for _hook in HOOKS:
    setattr(Held, _hook, _held_hook(_hook))
    setattr(AsyncHeld, _hook, _async_held_hook(_hook))


def held(kind: str) -> Held | AsyncHeld:
    return Held() if kind == "sync" else AsyncHeld()


@pytest.fixture
def holding() -> Iterator[list[Held | AsyncHeld]]:
    """Held handlers put here are released at teardown, whatever happened."""
    handlers: list[Held | AsyncHeld] = []
    yield handlers
    for handler in handlers:
        handler.release()


def hardened(handler: Held | AsyncHeld, policy: str, max_queue: int, **options: Any) -> Any:
    # settle=0: a root run's end does not wait for a backlog the test holds on purpose.
    given: dict[str, Any] = {"max_queue": max_queue, "on_full": policy, **options}
    return harden(handler, mode="offload", breaker=None, settle=0, **given)


# --------------------------------------------------------------------------------------------
# Runs and the checks
# --------------------------------------------------------------------------------------------


class FailsMidway(PacedFakeChatModel):
    """A real chat model whose provider cuts the stream after ``fail_after`` chunks."""

    fail_after: int = 10

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for index, chunk in enumerate(super()._stream(messages, stop, run_manager, **kwargs)):
            if index == self.fail_after:
                raise ValueError("the provider cut the stream")
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        index = 0
        async for chunk in super()._astream(messages, stop, run_manager, **kwargs):
            if index == self.fail_after:
                raise ValueError("the provider cut the stream")
            yield chunk
            index += 1


@dataclass(frozen=True)
class Run:
    """One chat-model run: its tag, its tokens, and whether the provider cuts it."""

    tag: str
    tokens: tuple[str, ...]
    fails: bool = False

    def model(self) -> PacedFakeChatModel:
        if self.fails:
            return FailsMidway(tokens=list(self.tokens), interval=0, fail_after=TOKENS // 2)
        return PacedFakeChatModel(tokens=list(self.tokens), interval=0)

    def emitted(self) -> list[Got]:
        """What LangChain emits for this run, in order."""
        sent = self.tokens[: TOKENS // 2] if self.fails else self.tokens
        tokens = [Got(TOKEN, self.tag, token) for token in sent]
        return [
            Got(START, self.tag, None),
            *tokens,
            Got(ERROR if self.fails else END, self.tag, None),
        ]

    def config(self, safe: Any) -> RunnableConfig:
        return {"callbacks": [safe], "tags": [self.tag]}


def plan(
    runs: int = RUNS, tokens: int = TOKENS, fail_every: int = 0, prefix: str = "r"
) -> list[Run]:
    return [
        Run(
            f"{prefix}{n}",
            tuple(make_tokens(tokens, word=f"{prefix}{n}-")),
            fails=bool(fail_every) and n % fail_every == fail_every - 1,
        )
        for n in range(runs)
    ]


def stream_all(runs: list[Run], safe: Any) -> None:
    for run in runs:
        try:
            for _ in run.model().stream("hi", config=run.config(safe)):
                pass
        except ValueError:
            assert run.fails


async def astream_all(runs: list[Run], safe: Any) -> None:
    for run in runs:
        try:
            async for _ in run.model().astream("hi", config=run.config(safe)):
                pass
        except ValueError:
            assert run.fails


async def emit(runs: list[Run], safe: Any, path: str) -> None:
    if path == "stream":
        await asyncio.to_thread(stream_all, runs, safe)
    else:
        await astream_all(runs, safe)


async def flushed(safe: Any) -> None:
    assert await safe.aflush(FLUSH), safecallbacks.stats(safe)


def received_by_run(handler: Held | AsyncHeld) -> dict[str, list[Got]]:
    grouped: dict[str, list[Got]] = defaultdict(list)
    for got in list(handler.got):
        grouped[got.tag].append(got)
    return grouped


def is_ordered_subset(got: list[Got], expected: list[Got]) -> bool:
    remaining = iter(expected)
    return all(item in remaining for item in got)  # consumes the iterator: order kept


def check_runs_whole(runs: dict[str, list[Got]], received: dict[str, list[Got]]) -> list[str]:
    """Each run got all its boundaries or none of its events; returns the runs lost whole."""
    lost = []
    for tag, emitted in runs.items():
        got = received.get(tag, [])
        assert len(set(got)) == len(got), f"{tag}: an event was delivered twice: {got}"
        assert is_ordered_subset(got, emitted), f"{tag}: out of order: {got}"
        boundaries = [g for g in emitted if g.hook in BOUNDARIES]
        got_boundaries = [g for g in got if g.hook in BOUNDARIES]
        if not got:
            lost.append(tag)
            continue
        assert got[0] == emitted[0], f"{tag}: events without the run's start: {got}"
        assert got_boundaries == boundaries, (
            f"{tag}: its start was delivered, so its end must be too: got {got_boundaries}"
        )
        assert got[-1] == emitted[-1], f"{tag}: an event after the run's end: {got}"
    return lost


def check_counts(safe: Any, handler: Held | AsyncHeld, emitted: list[Got]) -> None:
    """Exact accounting, in total and per hook: what was not delivered was dropped."""
    stats = safecallbacks.stats(safe)
    got = list(handler.got)
    assert stats.emitted == len(emitted), stats
    assert stats.delivered == len(got) and stats.failed == 0 and stats.skipped == 0, stats
    assert stats.dropped == len(emitted) - len(got), stats
    assert_accounted(stats)
    for hook in {g.hook for g in emitted}:
        row = stats.hooks[hook]
        sent = sum(1 for g in emitted if g.hook == hook)
        kept = sum(1 for g in got if g.hook == hook)
        assert (row.emitted, row.delivered, row.dropped, row.pending) == (
            sent,
            kept,
            sent - kept,
            0,
        ), (hook, row)


def check_tokens_shed_first(
    safe: Any, handler: Held | AsyncHeld, runs: list[Run], in_hand: int = 1
) -> None:
    """Every run whole, only token events dropped, the queue used to its bound."""
    emitted = {run.tag: run.emitted() for run in runs}
    lost = check_runs_whole(emitted, received_by_run(handler))
    assert not lost, f"runs lost whole though tokens could have been shed instead: {lost}"
    everything = [g for run in runs for g in run.emitted()]
    check_counts(safe, handler, everything)
    stats = safecallbacks.stats(safe)
    assert stats.dropped > 0, "the scenario must overflow the queue"
    assert stats.dropped == stats.hooks[TOKEN].dropped, "a boundary was dropped, not a token"
    delivered = len(handler.got)
    assert MAX_QUEUE <= delivered <= MAX_QUEUE + in_hand, (
        f"{delivered} delivered: the queue holds {MAX_QUEUE} (and one in hand)"
    )


# --------------------------------------------------------------------------------------------
# The bug report: blocked at the first event, max_queue=50, ten runs of 20 tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", DROPPING)
async def test_a_full_queue_sheds_tokens_and_keeps_every_start_and_end(
    policy: str, kind: str, path: str, holding: list[Held | AsyncHeld]
) -> None:
    handler = held(kind)
    holding.append(handler)
    safe = hardened(handler, policy, MAX_QUEUE)
    runs = plan()
    await emit(runs, safe, path)
    assert handler.entered.wait(5.0), "the handler never started its first delivery"
    assert safecallbacks.stats(safe).dropped > 0, "drops are counted as they happen"
    handler.release()
    await flushed(safe)
    starts = sum(1 for g in handler.got if g.hook == START)
    ends = sum(1 for g in handler.got if g.hook == END)
    assert (starts, ends) == (RUNS, RUNS), f"received {starts}/{RUNS} starts, {ends}/{RUNS} ends"
    check_tokens_shed_first(safe, handler, runs)


@pytest.mark.parametrize("kind", KINDS)
async def test_block_sheds_tokens_after_block_timeout_and_keeps_every_boundary(
    kind: str, holding: list[Held | AsyncHeld]
) -> None:
    """``on_full="block"``: an event waits ``block_timeout`` for room, then tokens go first."""
    handler = held(kind)
    holding.append(handler)
    wait = 0.002
    safe = hardened(handler, "block", MAX_QUEUE, block_timeout=wait)
    runs = plan()
    started = time.monotonic()
    await emit(runs, safe, "stream")
    took = time.monotonic() - started
    assert took < EVENTS * wait + 5.0, f"emitting took {took:.2f}s: block waits are bounded"
    handler.release()
    await flushed(safe)
    check_tokens_shed_first(safe, handler, runs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("policy", DROPPING)
async def test_error_events_are_kept_like_ends(
    policy: str, path: str, holding: list[Held | AsyncHeld]
) -> None:
    """Every third run is cut by its provider: its ``on_llm_error`` survives the full queue."""
    handler = held("sync")
    holding.append(handler)
    safe = hardened(handler, policy, MAX_QUEUE)
    runs = plan(fail_every=3)
    await emit(runs, safe, path)
    handler.release()
    await flushed(safe)
    check_tokens_shed_first(safe, handler, runs)
    errors = [g for g in handler.got if g.hook == ERROR]
    assert len(errors) == sum(run.fails for run in runs) == 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", DROPPING)
def test_shedding_with_threads_emitting_at_once_keeps_every_boundary(
    policy: str, kind: str, holding: list[Held | AsyncHeld]
) -> None:
    """Four threads stream five runs each into one held handler; 40 boundaries fit in 60."""
    handler = held(kind)
    holding.append(handler)
    max_queue = 60
    safe = hardened(handler, policy, max_queue)
    threads_runs = [plan(runs=5, tokens=10, prefix=f"t{n}r") for n in range(4)]
    together = threading.Barrier(len(threads_runs), timeout=5)
    errors: list[BaseException] = []

    def stream(runs: list[Run]) -> None:
        try:
            together.wait()
            stream_all(runs, safe)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(runs,)) for runs in threads_runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert safecallbacks.stats(safe).dropped > 0, "the scenario must overflow the queue"
    handler.release()
    assert safe.flush(FLUSH), safe.stats()
    all_runs = [run for runs in threads_runs for run in runs]
    emitted = {run.tag: run.emitted() for run in all_runs}
    lost = check_runs_whole(emitted, received_by_run(handler))
    assert not lost, f"runs lost whole though tokens could have been shed instead: {lost}"
    check_counts(safe, handler, [g for run in all_runs for g in run.emitted()])
    stats = safe.stats()
    assert stats.dropped == stats.hooks[TOKEN].dropped, "a boundary was dropped, not a token"


# --------------------------------------------------------------------------------------------
# Nothing but boundaries queued: a run whose start is dropped gets nothing else
# --------------------------------------------------------------------------------------------

BOUNDARY_QUEUE = 5


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest", "block"])
def test_a_run_whose_start_was_dropped_gets_none_of_its_events(
    policy: str, holding: list[Held | AsyncHeld]
) -> None:
    """Three chain runs (start and end only) fill the queue; then a chat model streams.

    The handler holds run 0's start; 0's end and runs 1 and 2 fill the queue
    (``max_queue=5``) with boundaries only. Whatever ``on_full`` does then, no run ends
    without a start, and a run whose start was received is not left without its end.
    """
    handler = Held()
    holding.append(handler)
    safe = hardened(handler, policy, BOUNDARY_QUEUE, block_timeout=0.01)
    echo = RunnableLambda(lambda text: text)
    chains = [f"b{n}" for n in range(3)]
    for tag in chains:
        echo.invoke(tag, config={"callbacks": [safe], "tags": [tag]})
    assert handler.entered.wait(5), "the handler never started its first delivery"
    model_run = Run("m3", tuple(make_tokens(5, word="m3-")))
    stream_all([model_run], safe)
    handler.release()
    assert safe.flush(FLUSH), safe.stats()

    emitted = {
        tag: [Got("on_chain_start", tag, None), Got("on_chain_end", tag, None)] for tag in chains
    }
    emitted[model_run.tag] = model_run.emitted()
    received = received_by_run(handler)
    lost = check_runs_whole(emitted, received)
    assert received["b0"] == emitted["b0"], "run 0's start was in hand: its end must follow"
    assert lost, "8 boundaries cannot all fit in 1 in hand + 5 queued: some run is lost whole"
    assert len(handler.got) <= BOUNDARY_QUEUE + 1, "the queue stays bounded"
    check_counts(safe, handler, [g for events in emitted.values() for g in events])
    if policy == "drop_newest":
        # The newest run's start met a queue of boundaries only: it and all its events go.
        assert lost == [model_run.tag]
        assert all(received[tag] == emitted[tag] for tag in chains)
