"""A hook a framework base declares is hardened wherever in the MRO it is implemented.

LangGraph's ``GraphCallbackHandler`` declares ``on_interrupt`` / ``on_resume``. A library
(another package) implements them in its own subclass, and a user subclasses the
library's class without overriding them: the library's body is still the hook LangGraph
calls, so it must be isolated like any hook, whatever package the user's class is in.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests._imports import import_or_skip

lg_callbacks = import_or_skip("langgraph.callbacks")
if not hasattr(lg_callbacks, "GraphCallbackHandler"):
    pytest.skip("GraphCallbackHandler needs a newer langgraph", allow_module_level=True)

from langgraph.callbacks import GraphCallbackHandler  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import interrupt  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

import safecallbacks  # noqa: E402
from safecallbacks._hooks import implemented_hooks  # noqa: E402


class LibTracer(GraphCallbackHandler):
    """A library's tracer: it really implements the hook LangGraph's base declares."""

    raise_error = True  # bare, what it raises ends the graph run

    def __init__(self) -> None:
        self.interrupts: list[Any] = []

    def on_interrupt(self, event: Any) -> None:
        self.interrupts.append(event)
        raise RuntimeError("a bug in the library's on_interrupt")


LibTracer.__module__ = "sometracinglib.callbacks"  # another package than the user's


class LibQuiet(GraphCallbackHandler):
    """A library class that leaves the framework's hooks alone."""


LibQuiet.__module__ = "sometracinglib.callbacks"


class Mine(LibTracer):
    """The user's subclass: the hook is inherited, not overridden."""


class MineWithHelper(LibTracer):
    def on_something_happened(self) -> None:  # an ordinary method of the user's, not a hook
        raise ValueError("the user's own helper")


class MineQuiet(LibQuiet):
    pass


def test_a_framework_hook_a_library_base_implements_counts_as_implemented() -> None:
    assert "on_interrupt" in implemented_hooks(LibTracer)
    assert "on_interrupt" in implemented_hooks(Mine)
    assert "on_interrupt" in implemented_hooks(MineWithHelper)
    # The framework's own do-nothing declaration is still not an implementation.
    assert "on_interrupt" not in implemented_hooks(LibQuiet)
    assert "on_interrupt" not in implemented_hooks(MineQuiet)
    assert "on_resume" not in implemented_hooks(Mine)
    # A user's own on_* helper is a method, not a hook.
    assert "on_something_happened" not in implemented_hooks(MineWithHelper)


def test_an_inherited_framework_hook_is_isolated_when_called_directly() -> None:
    with pytest.raises(RuntimeError, match="library's on_interrupt"):
        Mine().on_interrupt("event")  # bare, it raises

    handler = safecallbacks.harden(Mine(), mode="inline")
    handler.on_interrupt("event")  # must not raise
    stats = safecallbacks.stats(handler)
    assert handler.interrupts == ["event"], "the library's body ran"
    assert stats.failed == 1 and dict(stats.errors) == {"RuntimeError": 1}


def test_a_users_own_on_helper_is_left_alone() -> None:
    handler = safecallbacks.harden(MineWithHelper(), mode="inline")
    with pytest.raises(ValueError, match="the user's own helper"):
        handler.on_something_happened()
    assert safecallbacks.stats(handler).emitted == 0


class AskState(TypedDict, total=False):
    question: str
    answer: str


def asking_graph() -> Any:
    def ask(state: AskState) -> AskState:
        return {"answer": str(interrupt({"question": state["question"]}))}

    builder = StateGraph(AskState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=InMemorySaver())


def run_until_interrupt(handler: Any) -> Any:
    config: Any = {"configurable": {"thread_id": "t-1"}, "callbacks": [handler]}
    return asking_graph().invoke({"question": "ship it?"}, config)


@pytest.mark.parametrize("mode", ["inline", "offload"])
def test_an_inherited_framework_hook_is_isolated_when_langgraph_calls_it(mode: str) -> None:
    bare = Mine()
    with pytest.raises(RuntimeError, match="library's on_interrupt"):
        run_until_interrupt(bare)  # bare, the library's bug ends the graph run
    assert len(bare.interrupts) == 1

    handler = safecallbacks.harden(Mine(), mode=mode)
    try:
        result = run_until_interrupt(handler)
        assert result["__interrupt__"][0].value == {"question": "ship it?"}
        assert safecallbacks.flush(handler, 5.0)
        stats = safecallbacks.stats(handler)
        assert len(handler.interrupts) == 1
        assert stats.failed == 1 and dict(stats.errors) == {"RuntimeError": 1}
    finally:
        safecallbacks.close(handler, timeout=5.0)
