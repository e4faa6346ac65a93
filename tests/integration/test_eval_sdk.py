"""deepeval's LangChain ``CallbackHandler`` records the same traces hardened as bare.

deepeval is the evaluation SDK whose handler shares the most with its caller: its hooks
keep the current trace and span in ContextVars that the caller's code reads and writes
(``update_current_span`` in a step, deepeval's ``@tool``, ``@observe`` around the call,
``next_*_span`` staged before it). Run with no Confident AI key and in deepeval's
trace-testing mode (``_eval_sdk_support``): the finished trace's API body, the JSON
deepeval would post, is read in-process and compared as a span tree (names, parents,
types, inputs, outputs, model, provider, token counts, tokens streamed, metadata, metric
collections, trace fields), plus what deepeval still holds open and what its ContextVars
hold in the caller after the call. Read right after the call returns and again after
``safecallbacks.flush``; hardened by ``harden()`` and by ``install()``; over ``invoke``,
``stream`` and ``astream``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests._imports import import_or_skip, require_langchain_core

require_langchain_core("1.0", "deepeval's LangChain integration")
import_or_skip("deepeval.integrations.langchain")

from deepeval.tracing import trace_manager  # noqa: E402
from deepeval.tracing.trace_test_manager import trace_testing_manager  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402

import safecallbacks  # noqa: E402

from . import _eval_sdk_support as sdk  # noqa: E402
from ._compare import differences, plain, scrub  # noqa: E402

METHODS = ["invoke", "stream", "astream"]
ATTACH = ["harden", "install"]
SCENARIOS = ["standalone", "observe", "staged"]


@pytest.fixture(autouse=True)
def deepeval_local(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """deepeval in trace-testing mode (finished traces kept in-process, never posted),
    no telemetry, and none of another test's traces or spans left in its trace manager."""
    monkeypatch.setenv("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
    previous = trace_testing_manager.test_name
    trace_testing_manager.test_name = "safecallbacks-eval-sdk"
    sdk.reset_recording()
    trace_manager.clear_traces()
    try:
        yield
    finally:
        trace_testing_manager.test_name = previous
        sdk.reset_recording()
        trace_manager.clear_traces()


def is_hardened(handler: Any) -> bool:
    """Hardening swaps the handler's class for a generated subclass of its own."""
    return type(handler) is not sdk.CallbackHandler


def attempt(run: Callable[[Any], Any], handler: Any) -> Any:
    """``run(handler)``'s result, or what it raised: deepeval's ``@tool`` and the caller's
    own code raise when the span they expect is not in their context, and that is part
    of what is compared."""
    try:
        return run(handler)
    except Exception as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}


def record(
    attach: str | None,
    run: Callable[[Any], Any],
    harden: Callable[[Any], Any],
) -> tuple[Any, Any]:
    """Run ``run(handler)`` with a fresh handler, bare (``attach`` None) or hardened.

    Returns (read right after the call, read after ``safecallbacks.flush``); bare has
    nothing to flush, so both are the one read.
    """
    handler = sdk.new_handler()
    sdk.reset_recording()
    if attach is None:
        outcome = attempt(run, handler)
        now = plain({"outcome": outcome, **sdk.read_recording()})
        return now, now
    if attach == "harden":
        handler = harden(handler)
        outcome = attempt(run, handler)
        now = plain({"outcome": outcome, **sdk.read_recording()})
        assert safecallbacks.flush(handler, timeout=5.0), "hardened handler did not flush"
        return now, plain({"outcome": outcome, **sdk.read_recording()})
    safecallbacks.install()
    try:
        outcome = attempt(run, handler)
        now = plain({"outcome": outcome, **sdk.read_recording()})
        assert is_hardened(handler), "install() did not harden the handler in the config"
        assert safecallbacks.flush(handler, timeout=5.0), "hardened handler did not flush"
        return now, plain({"outcome": outcome, **sdk.read_recording()})
    finally:
        # uninstall() gives the handler its class back: flushed above, before this.
        safecallbacks.uninstall()


def assert_same_reads(bare: Any, right_after: Any, after_flush: Any) -> None:
    """Both hardened reads equal bare's; every differing field of either is listed."""
    found = [
        f"{when}: {difference}"
        for when, hardened_read in (("right after", right_after), ("after flush", after_flush))
        for difference in differences(scrub(bare, sdk.VOLATILE), scrub(hardened_read, sdk.VOLATILE))
    ]
    assert not found, "hardened recorded different data than bare:\n" + "\n".join(found[:60])


# -- 1. the same trace, read right after the call and after a flush ----------------------


def check_bare(scenario: str, method: str, bare: dict[str, Any]) -> None:
    """The harness sees what deepeval would post: the chain's spans in one trace, typed,
    with model, usage and the annotations the caller's code made through the ContextVars."""
    assert bare["outcome"].get("output") == sdk.REPLY.upper(), bare["outcome"]
    assert bare["open_traces"] == 0
    assert bare["open_spans"] == []
    tree = bare["finished_trace"]
    assert tree is not None, "bare deepeval finished no trace"
    expected = ([sdk.OBSERVED_SPAN] if scenario == "observe" else []) + sdk.CHAIN_SPANS
    assert sdk.span_names(tree) == expected
    assert tree["status"] == "SUCCESS"
    assert tree["name"] == sdk.TRACE_FIELDS["name"]
    assert tree["userId"] == sdk.TRACE_FIELDS["user_id"]
    assert tree["threadId"] == sdk.TRACE_FIELDS["thread_id"]
    assert [call["name"] for call in tree["toolsCalled"]] == ["shout"]
    root = sdk.span_named(tree, "RunnableSequence")
    assert root["type"] == "agent"  # LangChain's root run, also under @observe
    llm = sdk.span_named(tree, "MetadataChatModel")
    assert llm["type"] == "llm"
    assert (llm["model"], llm["provider"]) == ("fake-model-1", "fake")
    assert (llm["inputTokenCount"], llm["outputTokenCount"]) == (4, 9)
    assert llm["output"]["content"] == sdk.REPLY
    if method != "invoke":
        assert "".join(llm["tokenIntervals"]) == sdk.REPLY
    assert sdk.span_named(tree, "shout")["type"] == "tool"
    if method == "invoke":
        # Sync invoke: the step and deepeval's @tool see the spans the hooks opened.
        assert sdk.span_named(tree, "annotate")["metadata"] == {"annotated": True}
        assert sdk.span_named(tree, "shout")["metricCollection"] == "shout-metrics"
    if scenario == "observe":
        outer = sdk.span_named(tree, sdk.OBSERVED_SPAN)
        assert outer["metadata"]["after_chain"] is True
        assert tree["tags"] == ["after-chain"]
    if scenario == "staged":
        assert root["metadata"] == {"staged": "agent"}
        assert llm["metadata"] == {"staged": "llm"}
        assert llm["metricCollection"] == "llm-metrics"


@pytest.mark.parametrize("attach", ATTACH)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_trace_hardened_as_bare(
    hardened: Callable[[Any], Any], scenario: str, method: str, attach: str
) -> None:
    def run(handler: Any) -> Any:
        return sdk.run_scenario(scenario, method, handler, sdk.make_chain(method))

    bare, _ = record(None, run, hardened)
    check_bare(scenario, method, bare)

    right_after, after_flush = record(attach, run, hardened)

    assert_same_reads(bare, right_after, after_flush)


# -- 2. each call's trace is finished when that call returns -----------------------------


CALLS = 3


@pytest.mark.parametrize("attach", ATTACH)
@pytest.mark.parametrize("method", METHODS)
def test_each_call_has_finished_its_trace_when_it_returns(
    hardened: Callable[[Any], Any], method: str, attach: str
) -> None:
    """One handler, three calls in a row: right after each, deepeval has finished that
    call's trace (its input, output and spans) and the handler names it as its trace."""

    def run(handler: Any) -> list[dict[str, Any]]:
        chain = sdk.make_chain(method, replies=CALLS)
        seen = []
        for index in range(CALLS):
            sdk.reset_recording()
            config: RunnableConfig = {"callbacks": [handler]}
            if method == "astream":
                asyncio.run(sdk.acall(chain.with_config(run_name=f"call-{index}"), config))
            else:
                sdk.call(method, chain.with_config(run_name=f"call-{index}"), config)
            payload = trace_testing_manager.test_dict
            seen.append(
                {
                    "finished": payload is not None,
                    "root": payload and [s["name"] for s in payload["agentSpans"]],
                    "spans": payload and sum(len(payload[k]) for k in sdk.SPAN_LISTS),
                    "is_handler_trace": payload is not None
                    and payload["uuid"] == handler.trace_uuid,
                    "open_traces": len(trace_manager.active_traces),
                }
            )
        return seen

    bare, _ = record(None, run, hardened)
    assert isinstance(bare["outcome"], list), bare["outcome"]
    assert [call["root"] for call in bare["outcome"]] == [[f"call-{i}"] for i in range(CALLS)]
    assert all(call["is_handler_trace"] for call in bare["outcome"]), bare
    assert all(call["spans"] == len(sdk.CHAIN_SPANS) for call in bare["outcome"]), bare

    right_after, after_flush = record(attach, run, hardened)

    assert_same_reads(bare, right_after, after_flush)
