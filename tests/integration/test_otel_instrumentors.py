"""OpenTelemetry instrumentors of LangChain (OpenInference, Traceloop) with safecallbacks.

Each test runs the same real chain bare (no safecallbacks) and hardened (``install()``
before or after the instrumentor, ``harden_config`` of a ``CallbackManager``, or both),
exports the spans through a real SDK ``TracerProvider`` and compares the span trees field
by field: names, structure (parent links), kinds, statuses, every attribute, events.
The instrumentors inject exactly one tracer per callback manager, deciding by
``isinstance``; a hardened tracer must still be recognised (no second tracer, no duplicate
span tree), must run inline (tracers stamp times when the hook runs) and must be the
instrumentor's own tracer object (OpenInference's ``get_current_span()`` reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from langchain_core.callbacks import CallbackManager
from langchain_core.runnables import RunnableConfig
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import safecallbacks

from ._compare import assert_same
from ._otel_support import (
    REPLY,
    SPECS,
    BlockingExporter,
    Otel,
    Outcome,
    PatchSnapshot,
    Probe,
    RunRecorder,
    build_chain,
    current_span_getter,
    duration,
    make_provider,
    run_chain,
    span_named,
    span_tree,
    walk,
)

# OpenInference 0.1.80 calls message.text() (deprecated in langchain-core 1.x): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Calling .text\\(\\) as a method:DeprecationWarning")

INSTRUMENTORS = list(SPECS)
METHODS = ["invoke", "stream", "astream"]
# How the hardened run is hardened. "install" is activated after the instrumentor,
# "install-first" before it (the instrumentor is re-instrumented with install active).
# "harden_config" passes a CallbackManager whose handler is inheritable, "harden_config-local"
# one built as ``CallbackManager(handlers=[...])`` only (the handler stays on the root run).
WAYS = ["install", "install-first", "harden_config", "harden_config-local", "install+harden_config"]
SLEEP = 0.3
MAX_GAP = 1.0


@pytest.fixture
def make_otel() -> Iterator[Callable[..., Otel]]:
    """Instrumented ``Otel`` objects; teardown releases blocked exporters, uninstruments."""
    made: list[tuple[Otel, Any]] = []
    pristine = PatchSnapshot()

    def make(key: str, kind: str = "plain") -> Otel:
        spec = SPECS[key]
        pytest.importorskip(spec.module, reason=f"{spec.module} is not installed")
        try:
            instrumentor_class, tracer_class = spec.load()
        except ImportError as exc:  # e.g. needs a newer langchain-core than installed
            pytest.skip(f"{spec.key} does not import here: {exc}")
        for otel, _ in made:  # one instrumentor instance per class (a singleton): reuse it
            otel.uninstrument()
        inner = InMemorySpanExporter()
        provider, outer = make_provider(kind, inner)
        otel = Otel(spec, instrumentor_class(), tracer_class, provider, inner, pristine)
        made.append((otel, outer))
        if otel.instrumentor._is_instrumented_by_opentelemetry:
            pytest.fail(f"{spec.instrumentor} was left instrumented by an earlier test")
        otel.instrument()
        if not otel.instrumentor._is_instrumented_by_opentelemetry:
            otel.instrumented = False
            pytest.skip(f"{spec.instrumentor} refused to instrument (dependency conflict?)")
        return otel

    yield make
    for otel, outer in reversed(made):
        if isinstance(outer, BlockingExporter):
            outer.release()
        otel.uninstrument()
        otel.provider.shutdown()
    pristine.restore()


@pytest.fixture
def installer(make_otel: Callable[..., Otel]) -> Iterator[Callable[..., None]]:
    """``safecallbacks.install()`` for this test only: ``uninstall()`` in teardown.

    Depends on ``make_otel`` so ``uninstall()`` runs before the instrumentors are removed.
    """
    installed: list[bool] = []

    def install(**options: Any) -> None:
        safecallbacks.install(**options)
        installed.append(True)

    yield install
    if installed:
        safecallbacks.uninstall()


def manager_config(recorder: RunRecorder, inheritable: bool = True) -> RunnableConfig:
    """A config holding a ``CallbackManager``: the instrumentor injects its tracer into it.

    With ``inheritable`` the recorder is inheritable too (as ``CallbackManager.configure``
    builds managers), so child runs reach it; the injected tracer is in both lists either
    way, as ``add_handler(tracer, inherit=True)`` puts it.
    """
    if inheritable:
        return {"callbacks": CallbackManager(handlers=[recorder], inheritable_handlers=[recorder])}
    return {"callbacks": CallbackManager(handlers=[recorder])}


def record(otel: Otel, outcome: Outcome, probe: Probe) -> dict[str, Any]:
    """Everything compared bare vs hardened."""
    return {
        "error": repr(outcome.error),
        "chunks": outcome.chunks,
        "spans": span_tree(otel.finished()),
        "current_span_seen_by_user_code": probe.current_span,
        "tracers_in_run_manager": len(probe.tracers(otel.tracer_class)),
    }


def assert_hardened_tracer(otel: Otel, probe: Probe) -> None:
    """The one tracer the run saw is the instrumentor's own, hardened, run inline."""
    tracers = probe.tracers(otel.tracer_class)
    assert len(tracers) == 1, f"expected one {otel.tracer_class.__name__}, saw {tracers!r}"
    tracer = tracers[0]
    mro = type(tracer).__mro__
    assert otel.tracer_class in mro, f"{type(tracer)!r} is not a {otel.tracer_class!r}"
    assert type(tracer) is not otel.tracer_class, "the injected tracer was not hardened"
    assert tracer is otel.injected_tracer(), "the run saw another object than the injected tracer"
    assert safecallbacks.stats(tracer).mode == "inline"


def harden_run(
    otel: Otel, way: str, install: Callable[..., None]
) -> tuple[RunnableConfig | None, RunRecorder | None]:
    """Turn hardening on ``way`` (after the bare run); the config the hardened run uses."""
    if way == "install-first":
        otel.uninstrument()
        install()
        otel.instrument()
    elif way.startswith("install"):
        install()
    if "harden_config" in way:
        recorder = RunRecorder()
        config = manager_config(recorder, inheritable=not way.endswith("-local"))
        return cast(RunnableConfig, safecallbacks.harden_config(config)), recorder
    return None, None


def bare_config(way: str) -> tuple[RunnableConfig | None, RunRecorder | None]:
    """The bare run's config: the same shape as the hardened run's, nothing hardened."""
    if "harden_config" in way:
        recorder = RunRecorder()
        return manager_config(recorder, inheritable=not way.endswith("-local")), recorder
    return None, None


def phase_config(
    phase: str, otel: Otel, way: str, install: Callable[..., None]
) -> tuple[RunnableConfig | None, RunRecorder | None]:
    """The config of the "bare" run (``bare_config``) or of the "hardened" one (``harden_run``)."""
    if phase == "bare":
        return bare_config(way)
    return harden_run(otel, way, install)


def recorded_events(recorder: RunRecorder | None, hardened: bool) -> Any:
    if recorder is None:
        return None
    if hardened:
        assert safecallbacks.flush(recorder, timeout=5.0), "the config's handler did not flush"
    return list(recorder.events)


# ---------------------------------------------------------------------------- 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("key", INSTRUMENTORS)
def test_span_tree_hardened_equals_bare(
    make_otel: Callable[..., Otel],
    installer: Callable[..., None],
    key: str,
    way: str,
    method: str,
) -> None:
    """prompt | model | parser with a @tool and lambdas: hardened records the same spans.

    Also: user code inside the run finds the same current span, the run's manager holds
    exactly one instrumentor tracer (no duplicate tree), and the config's own handler got
    the same events.
    """
    otel = make_otel(key)
    getter = current_span_getter(otel.spec)

    probe = Probe(current_span_getter=getter)
    config, recorder = bare_config(way)
    outcome = run_chain(build_chain(probe), method, config)
    assert outcome.error is None, f"bare run failed: {outcome.error!r}"
    assert "".join(outcome.chunks) == REPLY
    bare = record(otel, outcome, probe)
    bare["recorder"] = recorded_events(recorder, hardened=False)
    assert bare["tracers_in_run_manager"] == 1
    assert bare["spans"], "the instrumentor recorded nothing bare"
    otel.exporter.clear()

    config, recorder = harden_run(otel, way, installer)
    probe = Probe(current_span_getter=getter)
    outcome = run_chain(build_chain(probe), method, config)
    assert outcome.error is None, f"hardened run failed: {outcome.error!r}"
    hardened = record(otel, outcome, probe)
    hardened["recorder"] = recorded_events(recorder, hardened=True)

    assert_same(bare, hardened)
    assert_hardened_tracer(otel, probe)
    if recorder is not None:
        assert safecallbacks.stats(recorder).mode == "offload"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("way", ["install", "harden_config"])
@pytest.mark.parametrize("key", INSTRUMENTORS)
def test_error_spans_hardened_equal_bare(
    make_otel: Callable[..., Otel],
    installer: Callable[..., None],
    key: str,
    way: str,
    method: str,
) -> None:
    """A tool that raises: same error for the caller, same ERROR statuses and exception
    events (type, message, stack trace) on the same spans."""
    otel = make_otel(key)
    records: dict[str, Any] = {}
    for phase in ("bare", "hardened"):
        config, recorder = phase_config(phase, otel, way, installer)
        probe = Probe()
        outcome = run_chain(build_chain(probe, fail=True), method, config)
        assert isinstance(outcome.error, LookupError), f"{phase}: {outcome.error!r}"
        records[phase] = record(otel, outcome, probe)
        records[phase]["recorder"] = recorded_events(recorder, hardened=phase == "hardened")
        otel.exporter.clear()
    failed = [n for n in walk(records["bare"]["spans"]) if n["status"]["code"] == "ERROR"]
    assert failed, "bare recorded no ERROR span: the comparison below would prove nothing"
    assert_same(records["bare"], records["hardened"])
    assert_hardened_tracer(otel, probe)


@pytest.mark.parametrize("method", ["invoke", "astream"])
@pytest.mark.parametrize("key", INSTRUMENTORS)
def test_uninstall_gives_the_instrumentor_its_tracer_back(
    make_otel: Callable[..., Otel], key: str, method: str
) -> None:
    """install() -> run -> uninstall() -> run: the instrumentor keeps tracing, with its own
    tracer class again, one tracer per run and the same spans as before install()."""
    otel = make_otel(key)
    trees = []
    for phase in ("bare", "installed", "uninstalled"):
        if phase == "installed":
            safecallbacks.install()
        probe = Probe()
        try:
            outcome = run_chain(build_chain(probe), method)
            if phase == "installed":
                assert_hardened_tracer(otel, probe)
        finally:
            if phase == "installed":
                safecallbacks.uninstall()
        assert outcome.error is None, f"{phase} run failed: {outcome.error!r}"
        tracers = probe.tracers(otel.tracer_class)
        assert len(tracers) == 1, f"{phase}: {tracers!r}"
        if phase != "installed":
            assert type(tracers[0]) is otel.tracer_class, f"{phase}: {type(tracers[0])!r}"
        trees.append(span_tree(otel.finished()))
        otel.exporter.clear()
    assert_same(trees[0], trees[1])
    assert_same(trees[0], trees[2])


# ---------------------------------------------------------------------------- 2


@pytest.mark.parametrize("method", ["invoke", "astream"])
@pytest.mark.parametrize("way", ["install", "harden_config"])
@pytest.mark.parametrize("key", INSTRUMENTORS)
def test_span_duration_of_a_slow_step(
    make_otel: Callable[..., Otel],
    installer: Callable[..., None],
    key: str,
    way: str,
    method: str,
) -> None:
    """A step that really sleeps 0.3 s is recorded >= 0.3 s, hardened as bare."""
    otel = make_otel(key)
    durations: dict[str, float] = {}
    trees: dict[str, Any] = {}
    for phase in ("bare", "hardened"):
        config, _ = phase_config(phase, otel, way, installer)
        probe = Probe()
        outcome = run_chain(build_chain(probe, sleep=SLEEP), method, config)
        assert outcome.error is None, f"{phase} run failed: {outcome.error!r}"
        spans = otel.finished()
        durations[phase] = duration(span_named(spans, "slow"))
        trees[phase] = span_tree(spans)
        otel.exporter.clear()
        if phase == "hardened":
            assert_hardened_tracer(otel, probe)
    assert durations["bare"] >= SLEEP, durations
    assert durations["hardened"] >= SLEEP, durations
    assert_same(trees["bare"], trees["hardened"])


# ---------------------------------------------------------------------------- 3


EXPORTERS = ["raises", "raises-cancelled", "blocks"]


def _exporter_run(
    make_otel: Callable[..., Otel],
    key: str,
    kind: str,
    method: str,
    configure: Callable[[], RunnableConfig | None],
) -> tuple[Otel, Outcome, Probe, bool | None]:
    """One run on a fresh provider whose exporter is ``kind``; True when it overlapped.

    ``configure`` runs once the instrumentor is on and returns the run's config.
    "blocks": the chain waits (bounded) until the Batch processor's export has started
    and is blocked, then streams; the result says whether the stream ended while that
    export was still blocked (so a stall in the stream would have shown as a gap).
    """
    otel = make_otel(key, kind)
    config = configure()
    processor = otel.provider._active_span_processor._span_processors[0]
    exporter = getattr(processor, "span_exporter", None)
    gate: Callable[[], None] | None = None
    if isinstance(exporter, BlockingExporter):
        blocking = exporter

        def gate() -> None:
            assert blocking.started.wait(3.0), "the batch export never started"

    probe = Probe()
    outcome = run_chain(build_chain(probe, gate=gate), method, config)
    overlapped = None
    if isinstance(exporter, BlockingExporter):
        overlapped = not exporter.first_returned.is_set()
        exporter.release()
    return otel, outcome, probe, overlapped


@pytest.mark.parametrize("method", ["stream", "astream"])
@pytest.mark.parametrize("way", ["install", "harden_config"])
@pytest.mark.parametrize("kind", EXPORTERS)
@pytest.mark.parametrize("key", INSTRUMENTORS)
def test_broken_exporter_never_stalls_the_stream(
    make_otel: Callable[..., Otel],
    installer: Callable[..., None],
    key: str,
    kind: str,
    way: str,
    method: str,
) -> None:
    """An exporter that raises or blocks 2 s: the stream completes, no gap reaches 1 s.

    The bare reference for "raises-cancelled" is the "raises" exporter: bare, a
    ``CancelledError`` from the exporter escapes ``span.end()`` and the tracer (the SDK
    catches only ``Exception``) and ends the stream; hardened, it must not.
    """

    def bare_configure() -> RunnableConfig | None:
        return bare_config(way)[0]

    def hardened_configure() -> RunnableConfig | None:
        if way == "install":
            installer()
            return None
        return cast(RunnableConfig, safecallbacks.harden_config(manager_config(RunRecorder())))

    bare_kind = "raises" if kind == "raises-cancelled" else kind
    otel, bare, _, _ = _exporter_run(make_otel, key, bare_kind, method, bare_configure)
    # (bare's gaps are not asserted: the brief's bound is the hardened stream's)
    assert bare.error is None, f"bare run failed: {bare.error!r}"
    assert "".join(bare.chunks) == REPLY
    bare_tree = span_tree(otel.finished())

    otel, hardened, probe, overlapped = _exporter_run(
        make_otel, key, kind, method, hardened_configure
    )
    assert hardened.error is None, f"hardened run failed: {hardened.error!r}"
    assert "".join(hardened.chunks) == REPLY
    assert len(hardened.chunks) > 10, hardened.chunks
    longest = hardened.longest_gap(excluded=probe.gate_seconds)
    assert longest < MAX_GAP, f"hardened stream stalled {longest:.3f} s, gaps {hardened.gaps}"
    if overlapped is not None:
        assert overlapped, "the stream did not run while the export was blocked"
    assert_hardened_tracer(otel, probe)
    assert_same(bare_tree, span_tree(otel.finished()))
