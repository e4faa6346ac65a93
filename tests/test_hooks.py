"""The hook catalogue is read from the installed langchain-core, not hard-coded."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from safecallbacks import harden
from safecallbacks._hooks import HOOKS, IGNORE_FLAGS, ignore_flag_for, implemented_hooks
from safecallbacks.testing import fake_chat_model


def test_every_on_method_of_the_installed_base_handler_is_a_hook() -> None:
    expected = {
        name
        for name, value in inspect.getmembers(BaseCallbackHandler)
        if name.startswith("on_") and callable(value)
    }
    assert set(HOOKS) == expected
    assert len(HOOKS) >= 19


def test_every_hook_has_langchains_ignore_flag() -> None:
    assert ignore_flag_for("on_llm_new_token") == "ignore_llm"
    assert ignore_flag_for("on_chat_model_start") == "ignore_chat_model"
    assert ignore_flag_for("on_tool_start") == "ignore_agent"
    assert ignore_flag_for("on_text") is None
    assert {ignore_flag_for(h) for h in HOOKS} - {None} <= set(IGNORE_FLAGS)


def test_only_overridden_hooks_count_as_implemented() -> None:
    class Partial(BaseCallbackHandler):
        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            pass

    assert set(implemented_hooks(Partial())) == {"on_llm_end"}


def test_a_hook_added_by_langchain_later_is_discovered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a newer langchain-core: a new ``on_*`` method is a hook, no release needed."""
    from safecallbacks import _hooks

    def on_future_event(self: Any, *args: Any, **kwargs: Any) -> None:
        pass

    monkeypatch.setattr(BaseCallbackHandler, "on_future_event", on_future_event, raising=False)
    assert "on_future_event" in _hooks._discover_hooks()


def test_a_hook_a_framework_base_declares_is_hardened_and_isolated() -> None:
    """A hook no langchain-core has, declared by a base class from another package."""
    from uuid import uuid4

    from langchain_core.callbacks.manager import handle_event

    class FrameworkBase(BaseCallbackHandler):
        def on_future_event(self, payload: Any) -> None:
            """The framework's do-nothing declaration."""

    FrameworkBase.__module__ = "someframework.callbacks"

    class Mine(FrameworkBase):
        raise_error = True

        def __init__(self) -> None:
            self.seen: list[Any] = []

        def on_future_event(self, payload: Any) -> None:
            self.seen.append(payload)
            raise ValueError("a bug in the user's hook")

    handler = harden(Mine(), mode="inline")
    assert "on_future_event" in type(handler)._sc_resolved
    handle_event([handler], "on_future_event", None, {"id": uuid4().hex})  # must not raise
    stats = handler.stats()
    assert len(handler.seen) == 1 and stats.failed == 1 and dict(stats.errors) == {"ValueError": 1}
    with pytest.raises(ValueError, match="a bug"):  # bare, the same call ends the run
        handle_event([Mine()], "on_future_event", None, {"id": "x"})


def test_on_stream_event_reaches_a_v2_protocol_handler() -> None:
    streaming = pytest.importorskip("langchain_core.tracers._streaming")
    marker = getattr(streaming, "_V2StreamingCallbackHandler", None)
    if marker is None or "on_stream_event" not in HOOKS:
        pytest.skip("this langchain-core has no v2 stream events")

    class Protocol(BaseCallbackHandler, marker):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.events: list[Any] = []

        def on_stream_event(self, event: Any, **kwargs: Any) -> None:
            self.events.append(event)
            raise RuntimeError("v2 handler bug")

    bare = Protocol()
    fake_chat_model(4).invoke("hi", {"callbacks": [bare]})
    inner = Protocol()
    safe = harden(inner)
    assert isinstance(safe, marker)
    fake_chat_model(4).invoke("hi", {"callbacks": [safe]})
    assert safe.flush(5.0)
    assert len(inner.events) == len(bare.events) > 0
    assert safe.stats().errors == {"RuntimeError": len(bare.events)}
