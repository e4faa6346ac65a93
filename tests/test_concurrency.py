"""Guarantee 4, "a shared handler keeps up, never more concurrent than bare".

One hardened handler shared by runs emitted at the same time (threads running ``.stream()``,
tasks running ``.astream()``) is delivered to the way bare LangChain calls it: each root run
(a trace: the outer run and every child under it) in emission order, and different root
runs concurrently, up to ``max_concurrency``. Never more concurrency than bare: runs that
did not overlap when emitted are delivered one after the other, and a handler that bare is
only ever called from one thread at a time (everything emitted from one thread, a
``run_inline`` sync handler on one event loop) is never called from two.

How the tests see it, with real LangChain and no mocks:

- the hardened handler is a *meter*: it counts deliveries in flight (from entry to exit,
  across an ``await`` for ``async def`` hooks), records the threads and loops it ran on, and
  stamps entry and exit on one process-wide clock;
- emission is recorded by two bare ``run_inline`` recorders, one before and one after the
  hardened handler in the same callbacks list (LangChain calls ``run_inline`` handlers in
  the emitter, in list order), stamping the same clock: an event was emitted to the
  hardened handler after the first stamp and before the second, so "e1 was emitted before
  e2" is known for sure whenever e1's second stamp precedes e2's first;
- "delivered at once" is shown by a *meeting*: the deliveries that must be in flight
  together each wait (bounded) for the others to be in flight too, while the emitters
  keep their runs open until they have met;
- "never at once" is made likely to be caught, not left to luck: every ``*_start``
  delivery lingers a few milliseconds, ending early as soon as a forbidden concurrent entry
  is seen, and a gated handler holds its deliveries still while the next run is emitted.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias
from unittest.mock import patch
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnableParallel

import safecallbacks
from safecallbacks import SafeHandler, _runs, harden, harden_config
from safecallbacks._hardened import engine_of
from safecallbacks.testing import (
    HOOKS,
    PacedFakeChatModel,
    RecordingHandler,
    assert_accounted,
    async_wait_until,
    make_tokens,
    options_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

KINDS = ["sync", "async"]
TOKEN = "on_llm_new_token"

MEET = 2.0  # how long a delivery waits for the others that must be in flight with it
HOLD = MEET + 1.0  # how long an emitter keeps its run open for them to meet
LINGER = 0.03  # how long a start delivery waits for a concurrent entry that must not come
GATE = 10.0  # a gated handler is released after this long whatever happens
FLUSH = 10.0
JOIN = 30.0

CLOCK = itertools.count()
"""One clock for emission and delivery stamps (``next`` on it is atomic under the GIL)."""


# --------------------------------------------------------------------------------------------
# Events and the bare recorders of their emission
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One hook call, as far as identity and order are concerned."""

    hook: str
    run_id: UUID
    parent: UUID | None
    token: str | None


Key: TypeAlias = tuple[Event, int]
"""An event and how many identical events came before it in its sequence."""


def event_of(hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Event:
    token = None
    if hook == TOKEN:
        token = str(kwargs["token"]) if "token" in kwargs else str(args[0])
    return Event(hook, kwargs["run_id"], kwargs.get("parent_run_id"), token)


def keyed(events: Iterable[Event]) -> list[Key]:
    seen: dict[Event, int] = defaultdict(int)
    keys = []
    for event in events:
        keys.append((event, seen[event]))
        seen[event] += 1
    return keys


def emitter_id() -> tuple[int, int | None]:
    """The emitting thread and, on an event loop, the emitting task."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return threading.get_ident(), (id(task) if task is not None else None)


class Emitted(BaseCallbackHandler):
    """A bare ``run_inline`` recorder: LangChain calls it in the emitter, in list order."""

    run_inline = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.stamps: list[int] = []
        self.emitters: list[tuple[int, int | None]] = []
        self.parents: dict[UUID, UUID | None] = {}

    def note(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        event = event_of(hook, args, kwargs)
        with self.lock:
            self.parents.setdefault(event.run_id, event.parent)
            self.events.append(event)
            self.emitters.append(emitter_id())
            self.stamps.append(next(CLOCK))

    def root_of(self, run_id: UUID) -> UUID:
        seen = 0
        while (parent := self.parents.get(run_id)) is not None and seen < 1000:
            run_id, seen = parent, seen + 1
        return run_id


def _noting(hook: str) -> Callable[..., None]:
    def note(self: Emitted, *args: Any, **kwargs: Any) -> None:
        self.note(hook, args, kwargs)

    note.__name__ = hook
    return note


for _hook in HOOKS:
    setattr(Emitted, _hook, _noting(_hook))


class Trace:
    """The emission as seen right before and right after the hardened handler."""

    def __init__(self) -> None:
        self.pre = Emitted()
        self.post = Emitted()

    def config(self, safe: Any, **extra: Any) -> RunnableConfig:
        config: dict[str, Any] = {"callbacks": [self.pre, safe, self.post], **extra}
        return config  # type: ignore[return-value]

    def root_of(self, event: Event) -> UUID:
        return self.pre.root_of(event.run_id)


# --------------------------------------------------------------------------------------------
# The hardened handler: a meter of deliveries in flight
# --------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    event: Event
    enter: int
    thread: int
    loop: asyncio.AbstractEventLoop | None
    exit: int = -1


Forbid: TypeAlias = Callable[[list[Event], Event], bool]
"""Given the events in delivery and one entering: is this entry a violation?"""


def any_overlap(flying: list[Event], entering: Event) -> bool:
    return bool(flying)


def same_root(trace: Trace) -> Forbid:
    def forbid(flying: list[Event], entering: Event) -> bool:
        root = trace.root_of(entering)
        return any(trace.root_of(other) == root for other in flying)

    return forbid


def more_than(cap: int) -> Forbid:
    def forbid(flying: list[Event], entering: Event) -> bool:
        return len(flying) >= cap

    return forbid


class Gauge:
    """Deliveries in flight: how many at most, on which threads, and every entry and exit."""

    def __init__(self, forbid: Forbid = any_overlap) -> None:
        self.lock = threading.Lock()
        self.forbid = forbid
        self.flying: list[Delivery] = []
        self.max_active = 0
        self.threads: set[int] = set()
        self.deliveries: list[Delivery] = []
        self.alarm = threading.Event()  # a forbidden concurrent entry was seen
        self.entered = threading.Event()

    def enter(self, event: Event) -> Delivery:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.lock:
            if self.forbid([d.event for d in self.flying], event):
                self.alarm.set()
            delivery = Delivery(event, next(CLOCK), threading.get_ident(), loop)
            self.flying.append(delivery)
            self.max_active = max(self.max_active, len(self.flying))
            self.threads.add(delivery.thread)
            self.deliveries.append(delivery)
        self.entered.set()
        return delivery

    def exit(self, delivery: Delivery) -> None:
        with self.lock:
            delivery.exit = next(CLOCK)
            self.flying.remove(delivery)

    def delivered(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)


SyncStep: TypeAlias = Callable[[Event], None]
AsyncStep: TypeAlias = Callable[[Event], Awaitable[None]]


class SyncMeter(BaseCallbackHandler):
    """A sync handler that meters its deliveries; ``step`` runs inside each one."""

    def __init__(self, gauge: Gauge, step: SyncStep | None = None, linger: float = LINGER) -> None:
        self.gauge = gauge
        self.step = step
        self.linger = linger

    def deliver(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        event = event_of(hook, args, kwargs)
        delivery = self.gauge.enter(event)
        try:
            if self.step is not None:
                self.step(event)
            if self.linger and hook.endswith("_start"):
                self.gauge.alarm.wait(self.linger)
        finally:
            self.gauge.exit(delivery)


class AsyncMeter(AsyncCallbackHandler):
    """The ``async def`` twin: a delivery is in flight from entry to exit, across awaits."""

    def __init__(self, gauge: Gauge, step: AsyncStep | None = None, linger: float = LINGER) -> None:
        self.gauge = gauge
        self.step = step
        self.linger = linger

    async def deliver(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        event = event_of(hook, args, kwargs)
        delivery = self.gauge.enter(event)
        try:
            await asyncio.sleep(0)  # every delivery suspends once: another may interleave here
            if self.step is not None:
                await self.step(event)
            if self.linger and hook.endswith("_start"):
                await async_wait_until(self.gauge.alarm.is_set, self.linger, interval=0.002)
        finally:
            self.gauge.exit(delivery)


def _sync_meter_hook(hook: str) -> Callable[..., None]:
    def deliver(self: SyncMeter, *args: Any, **kwargs: Any) -> None:
        self.deliver(hook, args, kwargs)

    deliver.__name__ = hook
    return deliver


def _async_meter_hook(hook: str) -> Callable[..., Awaitable[None]]:
    async def deliver(self: AsyncMeter, *args: Any, **kwargs: Any) -> None:
        await self.deliver(hook, args, kwargs)

    deliver.__name__ = hook
    return deliver


for _hook in HOOKS:
    setattr(SyncMeter, _hook, _sync_meter_hook(_hook))
    setattr(AsyncMeter, _hook, _async_meter_hook(_hook))


class InlineSyncMeter(SyncMeter):
    """A sync meter LangChain would call in the event loop's thread bare (``run_inline``)."""

    run_inline = True


Meter: TypeAlias = SyncMeter | AsyncMeter


def meter(
    kind: str,
    gauge: Gauge,
    sync_step: SyncStep | None = None,
    async_step: AsyncStep | None = None,
    linger: float = LINGER,
) -> Meter:
    if kind == "sync":
        return SyncMeter(gauge, sync_step, linger)
    return AsyncMeter(gauge, async_step, linger)


def offload(handler: Any, **options: Any) -> Any:
    """Harden for offloaded delivery (every failure counted, never a breaker skip).

    ``settle=0``: a root run's end does not wait for the handler's backlog, so the next
    run is emitted while the last one is still being delivered, as behind a slow handler
    (waiting would hide a delivery that overlaps the next run).
    """
    given: dict[str, Any] = {"settle": 0, **options}
    return harden(handler, mode="offload", breaker=None, **given)


class Meeting:
    """``parties`` deliveries that must be in flight at the same time.

    Each arrival waits (bounded by ``MEET``) until all parties are in flight at once; if
    that does not happen the meeting is broken and later arrivals do not wait. ``over`` is
    set once the meeting happened or broke: emitters keep their runs open until then.
    """

    def __init__(self, parties: int, who: Callable[[Event], bool]) -> None:
        self.parties = parties
        self.who = who
        self.lock = threading.Lock()
        self.present = 0
        self.reached = False
        self.broken = False
        self.over = threading.Event()
        self.results: list[bool] = []

    def _come(self) -> None:
        with self.lock:
            self.present += 1
            if self.present >= self.parties:
                self.reached = True
                self.over.set()

    def _leave(self) -> None:
        with self.lock:
            self.present -= 1
            if not self.reached:
                self.broken = True
                self.over.set()
            self.results.append(self.reached)

    def arrive(self, event: Event) -> None:
        if not self.who(event):
            return
        self._come()
        try:
            self.over.wait(MEET)
        finally:
            self._leave()

    async def aarrive(self, event: Event) -> None:
        if not self.who(event):
            return
        self._come()
        try:
            await async_wait_until(self.over.is_set, MEET, interval=0.002)
        finally:
            self._leave()

    def check(self) -> None:
        assert self.results == [True] * self.parties, (
            f"the {self.parties} deliveries that should have been in flight at once met "
            f"{self.results} (False: it waited {MEET}s alone: delivered one after the other)"
        )


def is_root_start(event: Event) -> bool:
    return event.hook.endswith("_start") and event.parent is None


class Gate:
    """Holds every delivery until released (bounded), without blocking an event loop."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def release(self) -> None:
        self.open.set()

    def wait(self, event: Event) -> None:
        self.open.wait(GATE)

    async def await_(self, event: Event) -> None:
        await async_wait_until(self.open.is_set, GATE, interval=0.002)


# --------------------------------------------------------------------------------------------
# Models, chains and the checks
# --------------------------------------------------------------------------------------------


def paced(tag: str, tokens: int = 5) -> PacedFakeChatModel:
    """A real chat model whose tokens are unique to ``tag``, streamed with no pause."""
    return PacedFakeChatModel(tokens=make_tokens(tokens, word=f"{tag}-"), interval=0)


def sequence(tag: str, tokens: int = 4) -> Runnable[dict[str, str], str]:
    """``prompt | model | parser``: a root run with three children, one a chat model."""
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    return prompt | paced(tag, tokens) | StrOutputParser()


class Emission:
    """What the recorders saw, indexed for the checks."""

    def __init__(self, trace: Trace) -> None:
        with trace.pre.lock, trace.post.lock:
            pre = list(
                zip(keyed(trace.pre.events), trace.pre.stamps, trace.pre.emitters, strict=True)
            )
            post = dict(zip(keyed(trace.post.events), trace.post.stamps, strict=True))
        self.keys = [key for key, _, _ in pre]
        self.before = {key: stamp for key, stamp, _ in pre}
        self.after = post
        self.emitter = {key: who for key, _, who in pre}
        self.root = {key: trace.root_of(key[0]) for key in self.keys}
        assert set(self.before) == set(self.after), "the two recorders saw different events"
        self.roots: dict[UUID, list[Key]] = defaultdict(list)
        for key in self.keys:
            self.roots[self.root[key]].append(key)

    def surely_before(self, first: Key, second: Key) -> bool:
        """``first`` was emitted to the hardened handler before ``second`` started to be."""
        return self.after[first] < self.before[second]

    def span(self, root: UUID) -> tuple[int, int]:
        """From just before the root's first event to just after its last."""
        keys = self.roots[root]
        return min(self.before[k] for k in keys), max(self.after[k] for k in keys)

    def most_open_at_once(self) -> int:
        """The most root runs open at one instant of the emission (an upper bound)."""
        edges = []
        for root in self.roots:
            start, end = self.span(root)
            edges += [(start, 1), (end, -1)]
        most = current = 0
        for _, step in sorted(edges):
            current += step
            most = max(most, current)
        return most


def positions(deliveries: list[Delivery]) -> dict[Key, int]:
    return {key: index for index, key in enumerate(keyed(d.event for d in deliveries))}


def check_all_delivered_once(emission: Emission, deliveries: list[Delivery]) -> None:
    got = keyed(d.event for d in deliveries)
    assert len(got) == len(set(got)), "an event was delivered twice"
    assert sorted(map(repr, got)) == sorted(map(repr, emission.keys)), "events lost or invented"


def check_order(
    emission: Emission, deliveries: list[Delivery], same: Callable[[Key, Key], bool]
) -> None:
    """Of two events ``same`` groups together, the one surely emitted first is delivered first."""
    at = positions(deliveries)
    for first, second in itertools.permutations(emission.keys, 2):
        if same(first, second) and emission.surely_before(first, second):
            assert at[first] < at[second], (
                f"{first[0].hook} {first[0].token or ''} was emitted before "
                f"{second[0].hook} {second[0].token or ''} but delivered after it"
            )


def check_each_trace_in_order(emission: Emission, deliveries: list[Delivery]) -> None:
    check_order(emission, deliveries, lambda a, b: emission.root[a] == emission.root[b])
    by_root: dict[UUID, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        by_root[emission.root[keyed([delivery.event])[0]]].append(delivery)
    for root, run in by_root.items():
        spans = sorted((d.enter, d.exit) for d in run)
        for (_, exit_), (enter, _) in itertools.pairwise(spans):
            assert exit_ < enter, f"two deliveries of root run {root} were in flight at once"


def check_each_emitter_in_order(emission: Emission, deliveries: list[Delivery]) -> None:
    """Events of one emitting thread (or task) keep their order, also across runs."""
    check_order(emission, deliveries, lambda a, b: emission.emitter[a] == emission.emitter[b])


def check_exact_order(emission: Emission, deliveries: list[Delivery]) -> None:
    got = [key for key in keyed(d.event for d in deliveries)]
    assert got == emission.keys, "not delivered in exactly the order emitted"


def check_runs_apart_stay_apart(emission: Emission, deliveries: list[Delivery]) -> None:
    """A root run that began after another ended is delivered only after all of it."""
    entries: dict[UUID, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        entries[emission.root[keyed([delivery.event])[0]]].append(delivery)
    for first, second in itertools.permutations(emission.roots, 2):
        if emission.span(first)[1] < emission.span(second)[0]:
            last_exit = max(d.exit for d in entries[first])
            first_entry = min(d.enter for d in entries[second])
            assert last_exit < first_entry, (
                "a root run emitted after another had ended was delivered before the "
                "other's deliveries were over"
            )


def check_delivered_as_emitted(emission: Emission, deliveries: list[Delivery]) -> None:
    """Every event once, each trace and each emitter in order, runs apart kept apart."""
    check_all_delivered_once(emission, deliveries)
    check_each_trace_in_order(emission, deliveries)
    check_each_emitter_in_order(emission, deliveries)
    check_runs_apart_stay_apart(emission, deliveries)


def check_accounted(safe: Any, emission: Emission) -> None:
    stats = safecallbacks.stats(safe)
    assert stats.emitted == stats.delivered == len(emission.keys), stats
    assert_accounted(stats)


def run_threads(targets: list[Callable[[], object]]) -> None:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not any(t.is_alive() for t in threads), "an emitting thread never finished"
    assert not errors, errors


# --------------------------------------------------------------------------------------------
# The option
# --------------------------------------------------------------------------------------------

BAD_MAX_CONCURRENCY: list[tuple[object, type[Exception]]] = [
    (0, ValueError),
    (-1, ValueError),
    ("x", TypeError),
    ("2", TypeError),
    (1.5, TypeError),
    (True, TypeError),
]


@pytest.mark.parametrize(("value", "error"), BAD_MAX_CONCURRENCY)
def test_max_concurrency_bad_values_are_refused_naming_the_option(
    value: object, error: type[Exception]
) -> None:
    def refused(make: Callable[[], object]) -> None:
        with pytest.raises(error, match="max_concurrency") as caught:
            make()
        assert "unknown option" not in str(caught.value), "max_concurrency is not an option"

    bad: dict[str, Any] = {"max_concurrency": value}  # built here: no such option yet fails here
    refused(lambda: harden(RecordingHandler(), **bad))
    refused(lambda: harden(**bad))
    refused(lambda: harden_config({"callbacks": []}, **bad))
    refused(lambda: SafeHandler(**bad))


def test_max_concurrency_is_an_option_everywhere_and_is_kept() -> None:
    for public in (harden, harden_config, safecallbacks.install, SafeHandler):
        parameter = inspect.signature(public).parameters.get("max_concurrency")
        assert parameter is not None, f"{public.__name__} has no max_concurrency option"
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    for value in (1, 3):
        given: dict[str, Any] = {"max_concurrency": value}
        safe = harden(RecordingHandler(), mode="offload", **given)
        assert getattr(options_of(safe), "max_concurrency", None) == value


# --------------------------------------------------------------------------------------------
# (a) Runs emitted at once are delivered at once
# --------------------------------------------------------------------------------------------

AT_ONCE = [
    pytest.param(2, {}, id="2-default"),
    pytest.param(4, {"max_concurrency": 4}, id="4-max_concurrency=4"),
]


@pytest.mark.parametrize(("parties", "options"), AT_ONCE)
def test_streams_from_threads_at_once_reach_a_sync_handler_at_once(
    parties: int, options: dict[str, Any]
) -> None:
    meeting = Meeting(parties, is_root_start)
    gauge = Gauge(forbid=lambda flying, entering: False)
    safe = offload(SyncMeter(gauge, meeting.arrive), **options)
    trace = Trace()
    together = threading.Barrier(parties, timeout=5)

    def stream(number: int) -> Callable[[], None]:
        def run() -> None:
            together.wait()
            model = paced(f"t{number}")
            for index, _ in enumerate(model.stream("hi", config=trace.config(safe))):
                if index == 0:
                    meeting.over.wait(HOLD)  # keep this run open until the deliveries met

        return run

    run_threads([stream(n) for n in range(parties)])
    assert safe.flush(FLUSH)
    meeting.check()
    assert gauge.max_active >= parties
    assert len(gauge.threads) >= parties, "delivered from several worker threads at once"
    emission = Emission(trace)
    check_all_delivered_once(emission, gauge.delivered())
    check_each_trace_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


@pytest.mark.parametrize(("parties", "options"), AT_ONCE)
async def test_astream_tasks_at_once_reach_an_async_handler_at_once(
    parties: int, options: dict[str, Any]
) -> None:
    meeting = Meeting(parties, is_root_start)
    gauge = Gauge(forbid=lambda flying, entering: False)
    safe = offload(AsyncMeter(gauge, meeting.aarrive), **options)
    trace = Trace()
    loop = asyncio.get_running_loop()

    async def astream(number: int) -> None:
        index = 0
        async for _ in paced(f"t{number}").astream("hi", config=trace.config(safe)):
            if index == 0:
                await async_wait_until(meeting.over.is_set, HOLD)
            index += 1

    await asyncio.wait_for(asyncio.gather(*(astream(n) for n in range(parties))), JOIN)
    assert await safe.aflush(FLUSH)
    meeting.check()
    assert gauge.max_active >= parties
    delivered = gauge.delivered()
    assert {d.loop for d in delivered} == {loop}, "async deliveries run on the emitting loop"
    assert gauge.threads == {threading.get_ident()}
    emission = Emission(trace)
    check_all_delivered_once(emission, delivered)
    check_each_trace_in_order(emission, delivered)
    check_accounted(safe, emission)


@pytest.mark.parametrize("kind", KINDS)
async def test_batch_roots_emitted_at_once_are_delivered_at_once(kind: str) -> None:
    """``.batch()`` / ``.abatch()`` make one root run per input, emitted concurrently."""
    parties = 3
    meeting = Meeting(parties, is_root_start)
    gauge = Gauge(forbid=lambda flying, entering: False)
    safe = offload(meter(kind, gauge, meeting.arrive, meeting.aarrive))
    trace = Trace()

    def hold(text: str) -> str:
        meeting.over.wait(HOLD)  # every root run is open until the deliveries met
        return text

    async def ahold(text: str) -> str:
        await async_wait_until(meeting.over.is_set, HOLD)
        return text

    chain = RunnableLambda(hold, afunc=ahold) | paced("batch", 3)
    inputs = [f"q{n}" for n in range(parties)]
    config = trace.config(safe, max_concurrency=parties)
    if kind == "sync":
        # A sequence's own .batch() starts every root run on the calling thread, one after
        # another (bare never calls those starts at once); Runnable.batch() of a lambda
        # starts each input's root run on an executor thread of its own.
        per_thread = RunnableLambda(lambda text: chain.invoke(text))
        await asyncio.to_thread(per_thread.batch, inputs, config)
        assert await asyncio.to_thread(safe.flush, FLUSH)
    else:
        await asyncio.wait_for(chain.abatch(inputs, config), JOIN)
        assert await safe.aflush(FLUSH)
    meeting.check()
    assert gauge.max_active >= parties
    emission = Emission(trace)
    check_all_delivered_once(emission, gauge.delivered())
    check_each_trace_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


def test_max_concurrency_caps_deliveries_in_flight() -> None:
    """Four runs open at once, ``max_concurrency=2``: two deliveries in flight, never three."""
    cap, emitters = 2, 4
    meeting = Meeting(cap, is_root_start)
    gauge = Gauge(forbid=more_than(cap))
    safe = offload(SyncMeter(gauge, meeting.arrive), max_concurrency=cap)
    trace = Trace()
    together = threading.Barrier(emitters, timeout=5)

    def stream(number: int) -> Callable[[], None]:
        def run() -> None:
            for index, _ in enumerate(paced(f"t{number}").stream("hi", config=trace.config(safe))):
                if index == 0:
                    together.wait()  # all four runs are open at once

        return run

    run_threads([stream(n) for n in range(emitters)])
    assert safe.flush(FLUSH)
    assert meeting.results[:cap] == [True] * cap, meeting.results
    assert gauge.max_active == cap and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    check_each_trace_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


async def test_max_concurrency_caps_async_deliveries_in_flight() -> None:
    """The same with an async handler whose deliveries suspend: tasks, never more than two."""
    cap, emitters = 2, 4
    meeting = Meeting(cap, is_root_start)
    gauge = Gauge(forbid=more_than(cap))
    safe = offload(AsyncMeter(gauge, meeting.aarrive), max_concurrency=cap)
    trace = Trace()
    opened = 0
    all_open = asyncio.Event()

    async def stream(number: int) -> None:
        nonlocal opened
        async for index, _ in _enumerate(paced(f"t{number}").astream("hi", trace.config(safe))):
            if index == 0:
                opened += 1
                if opened == emitters:
                    all_open.set()
                await asyncio.wait_for(all_open.wait(), 5)  # all four runs open at once

    await asyncio.gather(*(stream(n) for n in range(emitters)))
    assert await safecallbacks.aflush(safe, FLUSH)
    assert meeting.results[:cap] == [True] * cap, meeting.results
    assert gauge.max_active == cap and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    check_each_trace_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


async def _enumerate(items: Any) -> Any:
    index = 0
    async for item in items:
        yield index, item
        index += 1


# --------------------------------------------------------------------------------------------
# (b) Never more concurrent than bare
# --------------------------------------------------------------------------------------------

PATHS = ["stream", "astream"]


async def consume(model: Runnable[Any, Any], path: str, config: RunnableConfig) -> None:
    if path == "stream":
        await asyncio.to_thread(lambda: list(model.stream("hi", config=config)))
    else:
        async for _ in model.astream("hi", config=config):
            pass


async def settle(safe: Any, path: str) -> None:
    if path == "stream":
        assert await asyncio.to_thread(safe.flush, FLUSH)
    else:
        assert await safe.aflush(FLUSH)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
async def test_runs_streamed_one_after_another_are_never_delivered_at_once(
    kind: str, path: str
) -> None:
    gauge = Gauge()
    safe = offload(meter(kind, gauge))
    trace = Trace()
    for number in range(4):
        await consume(paced(f"r{number}"), path, trace.config(safe))
    await settle(safe, path)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    check_exact_order(emission, gauge.delivered())
    check_runs_apart_stay_apart(emission, gauge.delivered())
    check_accounted(safe, emission)


def interleaved(streams: list[Iterator[Any]]) -> None:
    """Step each stream in turn, one thread: their runs are open at once."""
    live = list(streams)
    while live:
        for stream in list(live):
            if next(stream, None) is None:
                live.remove(stream)


@pytest.mark.parametrize("kind", KINDS)
def test_generators_interleaved_by_hand_in_one_thread_are_delivered_one_at_a_time(
    kind: str,
) -> None:
    """Three runs open at once, but from one thread: bare calls the handler one at a time."""
    gauge = Gauge()
    safe = offload(meter(kind, gauge))
    trace = Trace()
    interleaved([iter(paced(f"g{n}", 6).stream("hi", config=trace.config(safe))) for n in range(3)])
    assert safe.flush(FLUSH)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    assert emission.most_open_at_once() == 3, "the runs were meant to be open at once"
    check_exact_order(emission, gauge.delivered())
    check_accounted(safe, emission)


@pytest.mark.parametrize("kind", KINDS)
async def test_async_generators_interleaved_by_hand_in_one_task_are_delivered_one_at_a_time(
    kind: str,
) -> None:
    gauge = Gauge()
    safe = offload(meter(kind, gauge))
    trace = Trace()
    streams = [paced(f"g{n}", 6).astream("hi", config=trace.config(safe)) for n in range(3)]
    live = list(streams)
    while live:
        for stream in list(live):
            try:
                await anext(stream)
            except StopAsyncIteration:
                live.remove(stream)
    assert await safe.aflush(FLUSH)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    assert emission.most_open_at_once() == 3, "the runs were meant to be open at once"
    check_exact_order(emission, gauge.delivered())
    check_accounted(safe, emission)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_run_invoked_inside_the_stream_loop_is_not_delivered_at_once(
    kind: str, path: str
) -> None:
    gauge = Gauge()
    safe = offload(meter(kind, gauge))
    trace = Trace()
    inner = RunnableLambda(lambda text: text) | paced("inner", 3)
    config = trace.config(safe)

    def sync_loop() -> None:
        for _ in paced("outer", 4).stream("hi", config=config):
            inner.invoke("again", config=config)

    if path == "stream":
        await asyncio.to_thread(sync_loop)
    else:
        async for _ in paced("outer", 4).astream("hi", config=config):
            await inner.ainvoke("again", config=config)
    await settle(safe, path)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    assert len(emission.roots) == 5
    check_exact_order(emission, gauge.delivered())
    check_accounted(safe, emission)


async def test_a_run_inline_sync_handler_under_concurrent_astream_tasks_is_one_at_a_time() -> None:
    """Bare, LangChain calls a ``run_inline`` sync handler in the loop's thread, in turn."""
    gauge = Gauge()
    safe = offload(InlineSyncMeter(gauge))
    trace = Trace()

    async def astream(number: int) -> None:
        async for _ in paced(f"task{number}", 5).astream("hi", config=trace.config(safe)):
            await asyncio.sleep(0)  # let the other tasks emit in between

    await asyncio.wait_for(asyncio.gather(*(astream(n) for n in range(10))), JOIN)
    assert await safe.aflush(FLUSH)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    assert emission.most_open_at_once() > 1, "the tasks were meant to overlap"
    check_exact_order(emission, gauge.delivered())
    check_accounted(safe, emission)


def test_max_concurrency_1_is_one_serial_lane_for_threads() -> None:
    emitters = 4
    gauge = Gauge()
    safe = offload(SyncMeter(gauge), max_concurrency=1)
    trace = Trace()
    together = threading.Barrier(emitters, timeout=5)

    def stream(number: int) -> Callable[[], None]:
        def run() -> None:
            for index, _ in enumerate(paced(f"t{number}").stream("hi", config=trace.config(safe))):
                if index == 0:
                    together.wait()  # every run is open at once

        return run

    run_threads([stream(n) for n in range(emitters)])
    assert safe.flush(FLUSH)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    assert emission.most_open_at_once() == emitters
    check_each_trace_in_order(emission, gauge.delivered())
    check_each_emitter_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


async def test_max_concurrency_1_is_one_serial_lane_for_tasks() -> None:
    emitters = 4
    gauge = Gauge()
    safe = offload(AsyncMeter(gauge), max_concurrency=1)
    trace = Trace()
    opened = [0]
    all_open = asyncio.Event()

    async def astream(number: int) -> None:
        index = 0
        async for _ in paced(f"t{number}").astream("hi", config=trace.config(safe)):
            if index == 0:
                opened[0] += 1
                if opened[0] == emitters:
                    all_open.set()
                await asyncio.wait_for(all_open.wait(), 5)
            index += 1

    await asyncio.wait_for(asyncio.gather(*(astream(n) for n in range(emitters))), JOIN)
    assert await safe.aflush(FLUSH)
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), gauge.max_active
    emission = Emission(trace)
    assert emission.most_open_at_once() == emitters
    check_each_trace_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


# --------------------------------------------------------------------------------------------
# (c) Each trace in emission order, children included
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_each_trace_of_concurrent_chains_is_delivered_in_emission_order(kind: str) -> None:
    """``prompt | model | parser`` from 4 threads (sync handler) or 4 tasks (async handler)."""
    trace = Trace()
    gauge = Gauge(forbid=same_root(trace))
    safe = offload(meter(kind, gauge))
    emitters = 4
    if kind == "sync":
        together = threading.Barrier(emitters, timeout=5)

        def stream(number: int) -> Callable[[], None]:
            def run() -> None:
                together.wait()
                chain = sequence(f"c{number}")
                for _ in chain.stream({"q": "hi"}, config=trace.config(safe)):
                    time.sleep(0)  # let the other threads emit in between

            return run

        await asyncio.to_thread(run_threads, [stream(n) for n in range(emitters)])
        assert await asyncio.to_thread(safe.flush, FLUSH)
    else:

        async def astream(number: int) -> None:
            chain = sequence(f"c{number}")
            async for _ in chain.astream({"q": "hi"}, config=trace.config(safe)):
                await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.gather(*(astream(n) for n in range(emitters))), JOIN)
        assert await safe.aflush(FLUSH)
    emission = Emission(trace)
    assert len(emission.roots) == emitters
    assert all(len(keys) > 8 for keys in emission.roots.values()), "each trace has children"
    check_all_delivered_once(emission, gauge.delivered())
    check_each_trace_in_order(emission, gauge.delivered())
    assert not gauge.alarm.is_set(), "two deliveries of one trace were in flight at once"
    if kind == "sync":
        check_each_emitter_in_order(emission, gauge.delivered())
    check_accounted(safe, emission)


def fan_out(text: str, config: RunnableConfig) -> list[Any]:
    """A child that runs a batch of its own (more children, on executor threads)."""
    return paced("fan", 3).batch([text, text], config=config)


async def afan_out(text: str, config: RunnableConfig) -> list[Any]:
    return await paced("fan", 3).abatch([text, text], config=config)


@pytest.mark.parametrize("kind", KINDS)
async def test_children_running_in_parallel_keep_their_trace_in_order(kind: str) -> None:
    """Children of one root emitted from several threads or tasks: causal order per trace."""
    trace = Trace()
    gauge = Gauge(forbid=same_root(trace))
    safe = offload(meter(kind, gauge))
    chain = RunnableParallel(
        a=paced("a", 4), b=paced("b", 4), c=RunnableLambda(fan_out, afunc=afan_out)
    )
    roots = 3
    if kind == "sync":
        config = trace.config(safe, max_concurrency=roots)
        await asyncio.to_thread(chain.batch, ["hi"] * roots, config)
        assert await asyncio.to_thread(safe.flush, FLUSH)
    else:
        await asyncio.wait_for(
            asyncio.gather(*(chain.ainvoke("hi", config=trace.config(safe)) for _ in range(roots))),
            JOIN,
        )
        assert await safe.aflush(FLUSH)
    emission = Emission(trace)
    assert len(emission.roots) == roots
    check_all_delivered_once(emission, gauge.delivered())
    check_each_trace_in_order(emission, gauge.delivered())
    assert not gauge.alarm.is_set(), "two deliveries of one trace were in flight at once"
    # Causality, whatever thread each child ran on: a child starts after its parent started
    # and ends before its parent ends.
    at = positions(gauge.delivered())
    first_of: dict[UUID, int] = {}
    last_of: dict[UUID, int] = {}
    for key, index in at.items():
        run_id = key[0].run_id
        first_of[run_id] = min(first_of.get(run_id, index), index)
        last_of[run_id] = max(last_of.get(run_id, index), index)
    for run_id, parent in trace.pre.parents.items():
        if parent is not None:
            assert first_of[parent] < first_of[run_id] and last_of[run_id] < last_of[parent]
    check_accounted(safe, emission)


# --------------------------------------------------------------------------------------------
# (d) Runs that did not overlap, from different threads or tasks: one after the other
# --------------------------------------------------------------------------------------------


def check_apart(safe: Any, gauge: Gauge, trace: Trace) -> None:
    assert gauge.max_active == 1 and not gauge.alarm.is_set(), (
        "the second run was delivered while the first one's backlog was still in delivery"
    )
    emission = Emission(trace)
    assert len(emission.roots) == 2
    check_runs_apart_stay_apart(emission, gauge.delivered())
    check_exact_order(emission, gauge.delivered())
    check_accounted(safe, emission)


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_from_another_thread_after_one_ended_waits_for_its_backlog(kind: str) -> None:
    gate = Gate()
    gauge = Gauge()
    safe = offload(meter(kind, gauge, gate.wait, gate.await_))
    trace = Trace()
    try:
        run_threads([lambda: list(paced("first", 8).stream("hi", config=trace.config(safe)))])
        assert gauge.entered.wait(5), "the first run's delivery never started"
        run_threads([lambda: list(paced("second", 8).stream("hi", config=trace.config(safe)))])
        assert safecallbacks.stats(safe).pending > 0, "the first run's backlog must be pending"
        # Give a wrong engine its chance to start the second run now (bounded).
        gauge.alarm.wait(0.2)
    finally:
        gate.release()
    assert safe.flush(FLUSH)
    check_apart(safe, gauge, trace)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_run_from_another_task_after_one_ended_waits_for_its_backlog(kind: str) -> None:
    gate = Gate()
    gauge = Gauge()
    safe = offload(meter(kind, gauge, gate.wait, gate.await_))
    trace = Trace()

    async def astream(tag: str) -> None:
        async for _ in paced(tag, 8).astream("hi", config=trace.config(safe)):
            pass

    try:
        await asyncio.wait_for(asyncio.create_task(astream("first")), JOIN)
        assert await async_wait_until(gauge.entered.is_set, 5)
        await asyncio.wait_for(asyncio.create_task(astream("second")), JOIN)
        assert safecallbacks.stats(safe).pending > 0, "the first run's backlog must be pending"
        await async_wait_until(gauge.alarm.is_set, 0.2)
    finally:
        gate.release()
    assert await safe.aflush(FLUSH)
    check_apart(safe, gauge, trace)


# --------------------------------------------------------------------------------------------
# (e) Property: random schedules of threads running short streams one after another
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    tokens: int
    yields: frozenset[int]


Schedule: TypeAlias = list[list[Stream]]


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    streams = st.builds(
        Stream,
        tokens=st.integers(1, 4),
        yields=st.frozensets(st.integers(0, 4), max_size=2),
    )
    return draw(st.lists(st.lists(streams, min_size=1, max_size=3), min_size=1, max_size=3))


@pytest.mark.timeout(240)
@given(
    schedule=schedules(),
    kind=st.sampled_from(KINDS),
    cap=st.one_of(st.none(), st.integers(1, 3)),
)
def test_random_schedules_never_deliver_more_concurrently_than_bare(
    schedule: Schedule, kind: str, cap: int | None
) -> None:
    trace = Trace()
    gauge = Gauge(forbid=same_root(trace))
    options = {} if cap is None else {"max_concurrency": cap}
    safe = offload(meter(kind, gauge, linger=0.003), **options)
    together = threading.Barrier(len(schedule), timeout=5)

    def emit(thread: int, streams: list[Stream]) -> Callable[[], None]:
        def run() -> None:
            together.wait()
            for number, stream in enumerate(streams):
                model = paced(f"t{thread}s{number}", stream.tokens)
                for index, _ in enumerate(model.stream("hi", config=trace.config(safe))):
                    if index in stream.yields:
                        time.sleep(0)  # give up the GIL: another thread may emit here

        return run

    run_threads([emit(n, streams) for n, streams in enumerate(schedule)])
    assert safe.flush(FLUSH)
    emission = Emission(trace)
    delivered = gauge.delivered()
    check_delivered_as_emitted(emission, delivered)
    assert gauge.max_active <= min(emission.most_open_at_once(), len(schedule))
    if cap is not None:
        assert gauge.max_active <= cap
    check_accounted(safe, emission)


# --------------------------------------------------------------------------------------------
# Slow, not stalled: a token-only forwarder shared by many streams
# --------------------------------------------------------------------------------------------


class TokenForwarder(BaseCallbackHandler):
    """Forwards tokens only (a websocket pusher, a metrics exporter): no start or end hooks
    of its own, 2 ms per token, never long enough for the watchdog to call it stalled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.tokens: dict[UUID, list[str]] = defaultdict(list)

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.002)
        with self.lock:
            self.inside -= 1
            self.tokens[run_id].append(token)


SPREAD_STREAMS = 8
SPREAD_TOKENS = 20


def check_forwarded(forwarder: TokenForwarder, safe: Any) -> None:
    want = make_tokens(SPREAD_TOKENS, "w")
    assert safecallbacks.flush(safe, FLUSH)
    assert len(forwarder.tokens) == SPREAD_STREAMS
    for tokens in forwarder.tokens.values():
        assert tokens == want  # every token of each run, in order
    assert_accounted(safecallbacks.stats(safe))
    # Bare, each stream calls it from its own thread or executor hop: 8 at once. One
    # worker going through every stream's 2 ms tokens in turn would keep this at 1 or 2.
    assert forwarder.most >= SPREAD_STREAMS // 2, forwarder.most


async def test_slow_tokens_of_concurrent_astreams_are_spread_over_workers() -> None:
    forwarder = TokenForwarder()
    safe = offload(forwarder)
    model = PacedFakeChatModel(tokens=make_tokens(SPREAD_TOKENS, "w"), interval=0.005)

    async def one() -> None:
        async for _ in model.astream("hi", config={"callbacks": [safe]}):
            pass

    await asyncio.gather(*(one() for _ in range(SPREAD_STREAMS)))
    await asyncio.to_thread(check_forwarded, forwarder, safe)


def test_slow_tokens_of_concurrent_thread_streams_are_spread_over_workers() -> None:
    forwarder = TokenForwarder()
    safe = offload(forwarder)
    model = PacedFakeChatModel(tokens=make_tokens(SPREAD_TOKENS, "w"), interval=0.005)
    together = threading.Barrier(SPREAD_STREAMS, timeout=5)

    def one() -> None:
        together.wait()
        for _ in model.stream("hi", config={"callbacks": [safe]}):
            pass

    run_threads([one for _ in range(SPREAD_STREAMS)])
    check_forwarded(forwarder, safe)


# --------------------------------------------------------------------------------------------
# Quick deliveries of many runs share one strand; slow ones split it, run by run
# --------------------------------------------------------------------------------------------


SHARED_STREAMS = 6
HANG = "hang"


class HangsOnOneToken(BaseCallbackHandler):
    """Quick, until one token of one run: that delivery hangs until released."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[UUID, list[str]] = defaultdict(list)
        self.hanging = threading.Event()
        self.release = threading.Event()

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        if token == HANG:
            self.hanging.set()
            self.release.wait(JOIN)  # longer than the test waits for the other runs
        with self.lock:
            self.tokens[run_id].append(token)

    def tokens_of(self, run_id: UUID) -> list[str]:
        with self.lock:
            return list(self.tokens.get(run_id, []))


def test_a_delivery_hung_while_runs_share_a_strand_holds_back_only_its_own_run() -> None:
    handler = HangsOnOneToken()
    safe = offload(handler)
    trace = Trace()
    hung = [*make_tokens(4, "a"), HANG, *make_tokens(4, "z")]
    others = make_tokens(20, "b")
    together = threading.Barrier(SHARED_STREAMS, timeout=5)

    def one(tokens: list[str]) -> Callable[[], None]:
        def run() -> None:
            together.wait()
            model = PacedFakeChatModel(tokens=tokens, interval=0.002)
            for _ in model.stream("hi", config=trace.config(safe)):
                pass

        return run

    streams = [one(hung)] + [one(others) for _ in range(SHARED_STREAMS - 1)]
    threads = [threading.Thread(target=target, daemon=True) for target in streams]
    for thread in threads:
        thread.start()
    try:
        assert handler.hanging.wait(GATE)
        for thread in threads:
            thread.join(JOIN)
        with trace.pre.lock:
            runs = {event.run_id for event in trace.pre.events}
        assert len(runs) == SHARED_STREAMS

        def others_delivered() -> bool:
            done = [handler.tokens_of(run) for run in runs]
            return sum(tokens == others for tokens in done) == SHARED_STREAMS - 1

        # Bare, each stream calls the handler from its own thread: the other runs go on.
        assert wait_until(others_delivered, GATE), {
            str(run)[:8]: len(handler.tokens_of(run)) for run in runs
        }
        held_back = [handler.tokens_of(run) for run in runs if handler.tokens_of(run) != others]
        assert held_back == [make_tokens(4, "a")]  # its own later tokens wait behind it
    finally:
        handler.release.set()
    assert safe.flush(FLUSH)
    delivered = sorted(map(tuple, (handler.tokens_of(run) for run in runs)))
    assert delivered == sorted([tuple(hung)] + [tuple(others)] * (SHARED_STREAMS - 1))
    assert_accounted(safecallbacks.stats(safe))


class TimedGauge(Gauge):
    def exited_before(self, stamp: int) -> set[Event]:
        """The events whose deliveries were over at ``stamp`` (of ``CLOCK``)."""
        with self.lock:
            return {d.event for d in self.deliveries if 0 <= d.exit < stamp}


class Flushes:
    """Flushes called from the emitting threads, each remembering what came before it."""

    def __init__(self, trace: Trace, safe: Any) -> None:
        self.trace = trace
        self.safe = safe
        self.lock = threading.Lock()
        self.done: list[tuple[int, bool, int]] = []  # (events emitted before, result, stamp)

    def flush(self) -> None:
        with self.trace.pre.lock:
            emitted = len(self.trace.pre.events)
        ok = safecallbacks.flush(self.safe, FLUSH)
        stamp = next(CLOCK)
        with self.lock:
            self.done.append((emitted, ok, stamp))

    def check(self, gauge: TimedGauge) -> None:
        with self.trace.pre.lock:
            events = list(self.trace.pre.events)
        for emitted, ok, stamp in self.done:
            assert ok, "a flush timed out"
            over = gauge.exited_before(stamp)
            missing = [event for event in events[:emitted] if event not in over]
            assert not missing, f"flush returned True before {missing[0]} was delivered"


def check_each_emitter_one_at_a_time(emission: Emission, deliveries: list[Delivery]) -> None:
    by_emitter: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    for delivery in deliveries:
        key = keyed([delivery.event])[0]
        by_emitter[emission.emitter[key]].append((delivery.enter, delivery.exit))
    for emitter, spans in by_emitter.items():
        for (_, exit_), (enter, _) in itertools.pairwise(sorted(spans)):
            assert exit_ < enter, f"two events of emitter {emitter} were delivered at once"


@pytest.mark.timeout(240)
@given(
    schedule=schedules(),
    slow=st.frozensets(st.integers(0, 30), max_size=4),
    flushes=st.frozensets(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=3),
    by_hand=st.frozensets(st.integers(0, 2), max_size=2),
)
def test_runs_sharing_a_strand_split_when_slow_in_order_and_flushed_exactly(
    schedule: Schedule,
    slow: frozenset[int],
    flushes: frozenset[tuple[int, int]],
    by_hand: frozenset[int],
) -> None:
    """Quick deliveries share one strand; a delivery found slow splits it run by run, at
    any point (chunk taken or not, barriers and ends inside), and calm merges it again.
    Threads in ``by_hand`` step their streams in turn: one emitter, runs open at once."""
    trace = Trace()
    counter = itertools.count()
    safe: Any = None

    def step(event: Event) -> None:
        if next(counter) in slow:  # slow until the shared strand has been split
            router = engine_of(safe)._thread_lane.router
            wait_until(lambda: router.merge_key is None, 1.0, interval=0.001)

    gauge = TimedGauge(forbid=same_root(trace))
    safe = offload(SyncMeter(gauge, step, linger=0))
    flusher = Flushes(trace, safe)
    together = threading.Barrier(len(schedule), timeout=5)

    def emit(thread: int, streams: list[Stream]) -> Callable[[], None]:
        def run() -> None:
            together.wait()
            if thread in by_hand:
                models = [paced(f"t{thread}s{n}", s.tokens) for n, s in enumerate(streams)]
                interleaved([iter(m.stream("hi", config=trace.config(safe))) for m in models])
                return
            for number, stream in enumerate(streams):
                model = paced(f"t{thread}s{number}", stream.tokens)
                for index, _ in enumerate(model.stream("hi", config=trace.config(safe))):
                    if index in stream.yields:
                        time.sleep(0)
                if (thread, number) in flushes:
                    flusher.flush()

        return run

    with patch.object(_runs, "CALM", 0.02):  # merged again soon after a split
        run_threads([emit(n, streams) for n, streams in enumerate(schedule)])
        assert safe.flush(FLUSH)
    emission = Emission(trace)
    delivered = gauge.delivered()
    check_delivered_as_emitted(emission, delivered)
    check_each_emitter_one_at_a_time(emission, delivered)
    assert not gauge.alarm.is_set(), "two deliveries of one root run were in flight at once"
    flusher.check(gauge)
    check_accounted(safe, emission)


def test_an_emitter_with_runs_on_its_own_strand_keeps_its_new_runs_there_once_calm() -> None:
    """Runs of one thread stay in order across a split and the merge after it: a run
    started once calm is back joins the strand its emitter's open run was moved to."""
    gauge = Gauge()
    safe: Any = None
    first = threading.Event()
    emitted = threading.Event()

    def step(event: Event) -> None:
        router = engine_of(safe)._thread_lane.router
        if not first.is_set():
            first.set()  # found stalled: the watchdog splits the shared strand
            assert wait_until(lambda: router.merge_key is None, GATE, interval=0.001)
        elif event.hook == "on_chat_model_start":
            # The newer run's start is held until all is emitted: what the older run
            # emitted after it must wait behind it, on whichever worker.
            assert emitted.wait(GATE)

    safe = offload(SyncMeter(gauge, step, linger=0))
    router = engine_of(safe)._thread_lane.router
    trace = Trace()
    with patch.object(_runs, "CALM", 0.05):
        older = iter(paced("old", 8).stream("hi", config=trace.config(safe)))
        next(older)
        assert first.wait(GATE)
        assert wait_until(lambda: router.merge_key is None, GATE, interval=0.001)
        # The stalled delivery is over and judged: then calm returns.
        assert wait_until(lambda: not router.claimed and not router.slow(), GATE, interval=0.001)
        newer = iter(paced("new", 8).stream("hi", config=trace.config(safe)))
        interleaved([older, newer])
        emitted.set()
        assert safe.flush(FLUSH)
    emission = Emission(trace)
    assert emission.most_open_at_once() == 2, "the runs were meant to be open at once"
    check_exact_order(emission, gauge.delivered())
    assert gauge.max_active == 1, gauge.max_active
    check_accounted(safe, emission)
