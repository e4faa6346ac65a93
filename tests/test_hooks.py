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


def test_a_hook_added_by_langchain_later_is_hardened_without_a_release() -> None:
    """Simulate a newer langchain-core: the proxy hardens whatever the handler implements."""

    class Future(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise ValueError("x")

    safe = harden(Future())
    assert "on_llm_new_token" in type(safe).__dict__


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
