"""``install()`` / ``uninstall()``: every handler that reaches a callback manager is hardened."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda

import safecallbacks
from safecallbacks import _compat
from safecallbacks.testing import RecordingHandler, fake_chat_model

try:  # langchain-core >= 0.3.49
    from langchain_core.callbacks import UsageMetadataCallbackHandler, get_usage_metadata_callback
except ImportError:  # pragma: no cover - older langchain-core
    UsageMetadataCallbackHandler = get_usage_metadata_callback = None  # type: ignore[assignment,misc]

needs_usage = pytest.mark.skipif(
    UsageMetadataCallbackHandler is None, reason="needs langchain-core >= 0.3.49"
)


@pytest.fixture
def installed() -> Iterator[None]:
    safecallbacks.install()
    try:
        yield
    finally:
        safecallbacks.uninstall()


def usage_model(replies: int = 1) -> GenericFakeChatModel:
    message = AIMessage(
        content="hello there",
        response_metadata={"model_name": "fake"},
        usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
    )
    return GenericFakeChatModel(messages=iter([message] * replies))


def seen_handlers(config: RunnableConfig) -> list[BaseCallbackHandler]:
    manager = config.get("callbacks")
    assert isinstance(manager, CallbackManager)
    return list(manager.handlers)


@needs_usage
def test_config_callbacks_are_hardened_in_place_by_kind(installed: None) -> None:
    recorder, usage = RecordingHandler(), UsageMetadataCallbackHandler()
    seen: list[BaseCallbackHandler] = []
    chain = RunnableLambda(lambda x, config: seen.extend(seen_handlers(config)) or x)
    list((chain | fake_chat_model(5)).stream("hi", config={"callbacks": [recorder, usage]}))
    assert recorder in seen and usage in seen
    assert isinstance(recorder, safecallbacks.SafeHandler) is False  # still its own class
    assert safecallbacks.stats(recorder).mode == "offload"
    assert safecallbacks.stats(usage).mode == "inline"
    assert safecallbacks.flush(recorder, 5.0)
    assert safecallbacks.stats(recorder).delivered == len(recorder.calls) > 0


@needs_usage
def test_configure_hook_handlers_are_hardened_and_never_doubled(installed: None) -> None:
    with get_usage_metadata_callback() as bare_reference:
        pass  # created under install, but only hardened when a manager meets it
    with get_usage_metadata_callback() as cb:
        usage_model(2).invoke("hi")
        safecallbacks.harden(cb)  # hardening it by hand as well changes nothing
        usage_model().invoke("hi", config={"callbacks": [cb]})
    assert type(bare_reference) is UsageMetadataCallbackHandler
    assert safecallbacks.stats(cb).mode == "inline"
    assert cb.usage_metadata == {
        "fake": {"input_tokens": 6, "output_tokens": 4, "total_tokens": 10}
    }


@needs_usage
def test_usage_totals_equal_bare() -> None:
    with get_usage_metadata_callback() as bare:
        usage_model().invoke("hi")
    safecallbacks.install()
    try:
        with get_usage_metadata_callback() as hardened:
            usage_model().invoke("hi")
    finally:
        safecallbacks.uninstall()
    assert hardened.usage_metadata == bare.usage_metadata != {}


def test_handlers_added_to_a_manager_later_are_hardened(installed: None) -> None:
    manager = CallbackManager(handlers=[])
    late = RecordingHandler()
    manager.add_handler(late)
    assert safecallbacks.stats(late).mode == "offload"


def test_overrides_choose_options_per_class(installed: None) -> None:
    safecallbacks.install(overrides={RecordingHandler: {"mode": "inline", "name": "rec"}})
    recorder = RecordingHandler()
    RunnableLambda(lambda x: x).invoke(1, config={"callbacks": [recorder]})
    stats = safecallbacks.stats(recorder)
    assert (stats.mode, stats.handler, stats.delivered) == ("inline", "rec", 2)
    assert [call.hook for call in recorder.calls] == ["on_chain_start", "on_chain_end"]


def test_install_is_idempotent_and_uninstall_gives_handlers_their_class_back() -> None:
    configure_before = _compat.configure_function()
    safecallbacks.install()
    patched = _compat.configure_function()
    safecallbacks.install()
    assert _compat.configure_function() is patched is not configure_before
    recorder, explicit = RecordingHandler(), safecallbacks.harden(RecordingHandler())
    try:
        RunnableLambda(lambda x: x).invoke(1, config={"callbacks": [recorder, explicit]})
        assert type(recorder) is not RecordingHandler
    finally:
        safecallbacks.uninstall()
    assert _compat.configure_function() is configure_before
    assert type(recorder) is RecordingHandler and "_sc_engine" not in vars(recorder)
    assert [call.hook for call in recorder.calls] == ["on_chain_start", "on_chain_end"]
    assert type(explicit) is not RecordingHandler  # hardened explicitly: stays hardened
    RunnableLambda(lambda x: x).invoke(1, config={"callbacks": [RecordingHandler()]})
    assert not safecallbacks._install.installed()


def test_install_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        safecallbacks.install(mode="fast")
    with pytest.raises(TypeError, match="keys must be handler classes or dotted class names"):
        safecallbacks.install(overrides={42: {}})
    with pytest.raises(TypeError, match="unknown option"):
        safecallbacks.install(overrides={RecordingHandler: {"mood": "inline"}})
    assert not safecallbacks._install.installed()


def test_install_fails_loudly_when_langchains_configure_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import langchain_core.callbacks.manager as manager

    monkeypatch.delattr(manager, "_configure")
    with pytest.raises(RuntimeError, match="_configure"):
        safecallbacks.install()
    assert not safecallbacks._install.installed()


class Raising(BaseCallbackHandler):
    raise_error = True

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        raise RuntimeError("a broken handler")


def test_an_installed_handler_can_no_longer_end_the_stream(installed: None) -> None:
    handler = Raising()
    chunks = list(fake_chat_model(10).stream("hi", config={"callbacks": [handler]}))
    assert len(chunks) == 19
    assert safecallbacks.flush(handler, 5.0)
    assert safecallbacks.stats(handler).failed == 19
