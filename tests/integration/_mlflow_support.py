"""MLflow tracing read back from a local store as comparable records.

MLflow's LangChain handler (``MlflowLangchainTracer``) writes spans through MLflow's own
OpenTelemetry ``TracerProvider`` into the tracking store. Here the store is a file store
in the test's tmp dir, written synchronously (``MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false``):
a trace is in the store as soon as its root span has ended, so what the store holds right
after a call returns is what the handler did during that call, not what MLflow's own
export queue got round to.

Traces become plain nested data (info, metadata, tags, a span tree with children under
their parents) that ``_compare.assert_same`` compares field by field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import pytest
from mlflow.entities import Span, Trace
from mlflow.tracking import fluent as mlflow_fluent
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from ._compare import VOLATILE_KEYS

DEFAULT_EXPERIMENT = "0"  # a new file store creates it

# Per-run noise in MLflow's records: ids and times, and sizes computed over the serialized
# trace (which holds ids and times). Everything else is compared.
MLFLOW_VOLATILE = VOLATILE_KEYS | {
    "request_time",
    "execution_duration",
    "start_time_ns",
    "end_time_ns",
    "timestamp_ns",
    "mlflow.trace.sizeBytes",
    "mlflow.trace.sizeStats",
}

CHAIN_ROOT = "RunnableSequence"


@contextmanager
def local_store(directory: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLflow pointed at a new file store in ``directory``; the previous URI restored after.

    ``_use_tracking_uri`` also resets MLflow's tracer provider both ways, so spans of
    this test are exported to this store and none of another test's are.
    """
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    # The file store is "in maintenance mode" in MLflow 3 and refuses to open without this;
    # a sqlite store would need alembic and a schema migration per test.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    # mlflow-tracing has no default-experiment lookup: set the experiment, as users do.
    # set_experiment sets a module global and the env var: both restored by monkeypatch.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", DEFAULT_EXPERIMENT)
    monkeypatch.setattr(mlflow_fluent, "_active_experiment_id", None)
    uri = f"file://{directory}/mlruns"
    with _use_tracking_uri(uri):
        mlflow.set_experiment(experiment_id=DEFAULT_EXPERIMENT)
        yield uri


def stored_traces() -> dict[str, Trace]:
    """Every trace in the current store, by id."""
    traces = mlflow.search_traces(locations=[DEFAULT_EXPERIMENT], return_type="list")
    return {trace.info.trace_id: trace for trace in traces}


def span_record(span: Span) -> dict[str, Any]:
    return {
        "name": span.name,
        "span_type": span.span_type,
        "status": {"code": str(span.status.status_code), "description": span.status.description},
        "inputs": span.inputs,
        "outputs": span.outputs,
        "attributes": dict(span.attributes),
        "events": [{"name": e.name, "attributes": dict(e.attributes)} for e in span.events],
    }


def span_tree(spans: Iterable[Span]) -> list[dict[str, Any]]:
    """Spans nested under their parents (children in start order); orphans are roots."""
    ordered = sorted(spans, key=lambda s: (s.start_time_ns, s.name))
    ids = {span.span_id for span in ordered}
    nodes = {span.span_id: {**span_record(span), "children": []} for span in ordered}
    roots: list[dict[str, Any]] = []
    for span in ordered:
        node = nodes[span.span_id]
        if span.parent_id in ids:
            nodes[span.parent_id]["children"].append(node)
        else:
            roots.append(node)
    return roots


def root_name(trace: Trace) -> str | None:
    roots = span_tree(trace.data.spans)
    return roots[0]["name"] if roots else None


def trace_record(trace: Trace) -> dict[str, Any]:
    info = trace.info
    return {
        "root": root_name(trace),
        "state": str(info.state),
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        "metadata": dict(info.trace_metadata),
        "tags": dict(info.tags),
        "token_usage": info.token_usage,
        "spans": span_tree(trace.data.spans),
    }


def walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from walk(node["children"])


def parents(nodes: list[dict[str, Any]], parent: str | None = None) -> dict[str, str | None]:
    """``{span name: parent span name}`` over a span tree."""
    found: dict[str, str | None] = {}
    for node in nodes:
        found[node["name"]] = parent
        found.update(parents(node["children"], node["name"]))
    return found


def which_trace(trace_id: str | None, new: dict[str, Trace]) -> str | None:
    """What a trace id read after a call points at, as something comparable.

    The root span name of that call's trace when it is one, else where it points.
    """
    if trace_id is None:
        return None
    if trace_id in new:
        return f"root span {root_name(new[trace_id])}"
    return "a trace this call did not store"
