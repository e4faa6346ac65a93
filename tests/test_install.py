"""``install()`` / ``uninstall()``: every handler that reaches a callback manager is hardened."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from pydantic import BaseModel

import safecallbacks
from safecallbacks import _compat, _install
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


@dataclasses.dataclass
class DataclassHandler(BaseCallbackHandler):
    tokens: int = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += 1


@dataclasses.dataclass(frozen=True)
class FrozenHandler(BaseCallbackHandler):
    seen: list[str] = dataclasses.field(default_factory=list)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.seen.append(token)


class PydanticHandler(BaseModel, BaseCallbackHandler):
    tokens: int = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += 1


class UnhashableHandler(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens = 0

    def __hash__(self) -> int:
        raise RuntimeError("no hash for you")

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += 1


def tokens_of(handler: Any) -> int:
    return len(handler.seen) if isinstance(handler, FrozenHandler) else int(handler.tokens)


@pytest.mark.parametrize(
    "make", [DataclassHandler, FrozenHandler, PydanticHandler, UnhashableHandler]
)
def test_install_never_kills_a_run_whatever_the_handler_class(
    installed: None, make: Callable[[], BaseCallbackHandler]
) -> None:
    handler = make()
    chunks = list(fake_chat_model(5).stream("hi", config={"callbacks": [handler]}))
    assert len(chunks) == 9
    assert safecallbacks.flush(handler, 5.0)
    assert tokens_of(handler) == 9
    assert safecallbacks.stats(handler).delivered == 9


class Sealed(BaseCallbackHandler):
    """A class that refuses subclasses: it cannot be hardened."""

    def __init__(self) -> None:
        self.tokens = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("Sealed cannot be subclassed")

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens += 1


def test_a_handler_that_cannot_be_hardened_stays_bare_logged_once_and_counted(
    installed: None,
) -> None:
    before = _install.not_hardened()
    handlers = [Sealed(), Sealed()]
    with structlog.testing.capture_logs() as logs:
        for handler in handlers:
            chunks = list(fake_chat_model(5).stream("hi", config={"callbacks": [handler]}))
            assert len(chunks) == 9
    assert [type(handler) for handler in handlers] == [Sealed, Sealed]
    assert [handler.tokens for handler in handlers] == [9, 9]
    assert _install.not_hardened() - before == 2
    warnings = [line for line in logs if line["event"] == "install_could_not_harden"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["handler"].endswith("Sealed")
    assert "Sealed cannot be subclassed" in warnings[0]["error"]
