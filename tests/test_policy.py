"""What ``mode="auto"`` picks for each kind of handler, and that explicit modes win."""

from __future__ import annotations

import importlib

import pytest

import safecallbacks
from safecallbacks._policy import auto_mode, is_plumbing
from safecallbacks.testing import AsyncRecordingHandler, RecordingHandler

INLINE = [
    ("langchain_core.tracers.langchain", "LangChainTracer"),
    ("langchain_core.tracers.stdout", "ConsoleCallbackHandler"),
    ("langchain_core.callbacks.stdout", "StdOutCallbackHandler"),
    ("langchain_core.callbacks.streaming_stdout", "StreamingStdOutCallbackHandler"),
    ("langchain_core.callbacks.usage", "UsageMetadataCallbackHandler"),
    ("langchain_core.callbacks.file", "FileCallbackHandler"),
    ("langchain_classic.callbacks.streaming_aiter", "AsyncIteratorCallbackHandler"),
    ("langfuse.langchain", "CallbackHandler"),
    ("openinference.instrumentation.langchain._tracer", "OpenInferenceTracer"),
    ("opentelemetry.instrumentation.langchain.callback_handler", "TraceloopCallbackHandler"),
]


def _load(module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except Exception as exc:  # an optional package, or one that needs a newer langchain-core
        pytest.skip(f"{module}.{name} not importable here: {exc!r:.100}")


@pytest.mark.parametrize(("module", "name"), INLINE, ids=[name for _, name in INLINE])
def test_tracers_and_collectors_run_inline(module: str, name: str) -> None:
    cls = _load(module, name)
    assert auto_mode(cls) == "inline"
    assert not is_plumbing(cls)


def test_everything_else_is_offloaded() -> None:
    assert auto_mode(RecordingHandler) == auto_mode(AsyncRecordingHandler) == "offload"
    assert safecallbacks.stats(safecallbacks.harden(RecordingHandler())).mode == "offload"


def test_explicit_modes_win_over_auto() -> None:
    from langchain_core.callbacks import StdOutCallbackHandler

    offloaded = safecallbacks.harden(StdOutCallbackHandler(), mode="offload")
    inline = safecallbacks.harden(RecordingHandler(), mode="inline")
    assert safecallbacks.stats(offloaded).mode == "offload"
    assert safecallbacks.stats(inline).mode == "inline"


def test_a_subclass_of_a_tracer_is_a_tracer() -> None:
    from langchain_core.tracers.base import BaseTracer

    class MyTracer(BaseTracer):
        def _persist_run(self, run: object) -> None:
            pass

    assert auto_mode(MyTracer) == "inline"
