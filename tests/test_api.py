"""The ways in (SafeHandler, harden, harden_config; install() in test_install.py) on every
LangChain call style."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableLambda

from safecallbacks import SafeHandler, StopStream, harden, harden_config, stats
from safecallbacks.testing import (
    AsyncRecordingHandler,
    RecordingHandler,
    fake_chat_model,
    options_of,
)

TOKENS = 8
CHUNKS = 2 * TOKENS - 1


class Audit(SafeHandler):
    """The docs' example (ways-in.md): a sync token hook and an async end hook."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []
        self.ended = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        self.ended += 1


class NoSuperInit(SafeHandler):
    def __init__(self, label: str) -> None:  # forgets super().__init__() on purpose
        self.label = label
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(f"{self.label}:{token}")


@harden
class Decorated(RecordingHandler):
    pass


@harden(max_queue=50_000, name="metrics")
class DecoratedWithOptions(RecordingHandler):
    pass


def _stream(handler: BaseCallbackHandler) -> list[str]:
    return [c.content for c in fake_chat_model(TOKENS).stream("hi", {"callbacks": [handler]})]


def test_subclass_with_sync_and_async_hooks_on_a_sync_stream() -> None:
    audit = Audit()
    assert len(_stream(audit)) == CHUNKS
    assert audit.flush(5.0)
    assert len(audit.tokens) == CHUNKS and audit.ended == 1


async def test_subclass_with_sync_and_async_hooks_on_an_async_stream() -> None:
    audit = Audit()
    chunks = [c async for c in fake_chat_model(TOKENS).astream("hi", {"callbacks": [audit]})]
    assert len(chunks) == CHUNKS
    assert await audit.aflush(5.0)
    assert len(audit.tokens) == CHUNKS and audit.ended == 1


def test_subclass_that_skips_super_init_still_works() -> None:
    handler = NoSuperInit("x")
    _stream(handler)
    assert handler.flush(5.0)
    assert handler.tokens[:2] == ["x:w0", "x: "]
    assert handler.stats().delivered == CHUNKS


def test_subclass_of_a_subclass_calling_super_is_delivered_once() -> None:
    class Base(SafeHandler):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.calls.append(f"base:{token}")

    class Child(Base):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.calls.append(f"child:{token}")
            super().on_llm_new_token(token, **kwargs)

    child = Child()
    _stream(child)
    assert child.flush(5.0)
    assert child.calls[:2] == ["child:w0", "base:w0"]
    assert len(child.calls) == 2 * CHUNKS
    assert child.stats().emitted == CHUNKS


def test_decorated_class_with_and_without_options() -> None:
    plain, tuned = Decorated(), DecoratedWithOptions()
    assert isinstance(plain, RecordingHandler) and isinstance(tuned, BaseCallbackHandler)
    for handler in (plain, tuned):
        _stream(handler)
        assert handler.flush(5.0)
        assert len(handler.tokens()) == CHUNKS
    assert tuned.stats().handler == "metrics"
    assert options_of(tuned).max_queue == 50_000
    assert plain.stats().handler == "Decorated"


def test_harden_instance_hardens_the_handler_itself_once() -> None:
    recorder = RecordingHandler()
    safe = harden(recorder, max_queue=7)
    assert safe is recorder and isinstance(safe, RecordingHandler)
    assert harden(recorder) is safe and harden(safe, max_queue=7) is safe
    with pytest.raises(ValueError, match=r"already hardened with other options.*max_queue=7"):
        harden(recorder, max_queue=5)


@pytest.mark.parametrize("style", ["invoke", "batch", "stream"])
def test_call_styles_deliver_everything(style: str) -> None:
    recorder = RecordingHandler()
    safe = harden(recorder)
    model = fake_chat_model(TOKENS, replies=3)
    config: Any = {"callbacks": [safe]}
    if style == "invoke":
        model.invoke("hi", config)
    elif style == "batch":
        model.batch(["a", "b", "c"], config)
    else:
        list(model.stream("hi", config))
    assert safe.flush(5.0)
    starts = recorder.hooks("on_chat_model_start")
    ends = recorder.hooks("on_llm_end")
    assert len(starts) == len(ends) == (3 if style == "batch" else 1)
    assert {c.run_id for c in starts} == {c.run_id for c in ends}


async def test_async_call_styles_and_astream_events_are_unchanged() -> None:
    recorder = AsyncRecordingHandler()
    safe = harden(recorder)
    model = fake_chat_model(TOKENS, replies=4)
    await model.ainvoke("hi", {"callbacks": [safe]})
    await model.abatch(["a", "b"], {"callbacks": [safe]})
    bare_events = [
        e["event"] async for e in fake_chat_model(TOKENS).astream_events("hi", version="v2")
    ]
    events = [
        e["event"] async for e in model.astream_events("hi", {"callbacks": [safe]}, version="v2")
    ]
    assert events == bare_events
    assert await safe.aflush(5.0)
    assert len([c for c in recorder.calls if c.hook == "on_llm_end"]) == 4


def test_chain_with_a_runnable_lambda_keeps_output() -> None:
    chain = RunnableLambda(lambda x: x) | fake_chat_model(TOKENS, replies=2)
    bare = [c.content for c in chain.stream("hi")]
    recorder = RecordingHandler()
    hardened = [c.content for c in chain.stream("hi", harden_config({"callbacks": [recorder]}))]
    assert hardened == bare


def test_chat_model_start_falls_back_to_llm_start_like_langchain() -> None:
    class LlmOnly(BaseCallbackHandler):
        def __init__(self) -> None:
            self.prompts: list[list[str]] = []

        def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
            self.prompts.append(prompts)

    class RaisesNotImplemented(LlmOnly):
        def on_chat_model_start(
            self, serialized: Any, messages: list[list[BaseMessage]], **kwargs: Any
        ) -> None:
            raise NotImplementedError

    for cls in (LlmOnly, RaisesNotImplemented):
        for mode in ("offload", "inline"):
            bare = cls()
            list(fake_chat_model(2).stream("hello", {"callbacks": [bare]}))
            inner = cls()
            safe = harden(inner, mode=mode)
            list(fake_chat_model(2).stream("hello", {"callbacks": [safe]}))
            assert safe.flush(5.0)
            assert inner.prompts == bare.prompts == [["Human: hello"]]


async def test_async_chat_model_start_falls_back_to_llm_start_like_langchain() -> None:
    class AsyncLlmOnly(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.prompts: list[list[str]] = []

        async def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
            await asyncio.sleep(0)  # suspends once: the rest is stepped by the consumer
            self.prompts.append(prompts)

        async def on_chat_model_start(
            self, serialized: Any, messages: list[list[BaseMessage]], **kwargs: Any
        ) -> None:
            raise NotImplementedError

    bare = AsyncLlmOnly()
    async for _ in fake_chat_model(2).astream("hello", {"callbacks": [bare]}):
        pass
    for mode in ("offload", "inline"):
        inner = AsyncLlmOnly()
        safe = harden(inner, mode=mode)
        async for _ in fake_chat_model(2).astream("hello", {"callbacks": [safe]}):
            pass
        assert await safe.aflush(5.0)
        assert inner.prompts == bare.prompts == [["Human: hello"]]
        assert stats(safe).failed == 0


def test_ignore_flags_read_through_live() -> None:
    class Switchable(RecordingHandler):
        mute = False

        @property
        def ignore_llm(self) -> bool:
            return self.mute

    inner = Switchable()
    safe = harden(inner)
    _stream(safe)
    inner.mute = True
    assert safe.ignore_llm is True
    _stream(safe)
    assert safe.flush(5.0)
    assert len(inner.tokens()) == CHUNKS


def test_inline_mode_delivers_before_the_next_chunk() -> None:
    recorder = RecordingHandler()
    safe = harden(recorder, mode="inline")
    for index, _ in enumerate(fake_chat_model(TOKENS).stream("hi", {"callbacks": [safe]})):
        assert len(recorder.tokens()) == index + 1


def test_inline_async_hook_from_sync_code_uses_one_background_loop() -> None:
    loops: set[int] = set()

    class Async(AsyncCallbackHandler):
        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            loops.add(id(asyncio.get_running_loop()))

    safe = harden(Async(), mode="inline")
    for _ in fake_chat_model(TOKENS).stream("hi", {"callbacks": [safe]}):
        pass
    assert safe.stats().delivered == CHUNKS
    assert len(loops) == 1


def test_stop_stream_in_inline_mode_reaches_the_caller_at_once() -> None:
    class Moderator(SafeHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            if token == "w3":
                raise StopStream("moderation hit")

    received: list[str] = []
    with pytest.raises(StopStream, match="moderation hit"):
        for chunk in fake_chat_model(TOKENS).stream(
            "hi", {"callbacks": [Moderator(mode="inline")]}
        ):
            received.append(str(chunk.content))
    assert received == ["w0", " ", "w1", " ", "w2", " "]


async def test_stop_stream_in_inline_mode_on_astream() -> None:
    class Stop(SafeHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise StopStream("stop")

    with pytest.raises(StopStream):
        async for _ in fake_chat_model(TOKENS).astream("hi", {"callbacks": [Stop(mode="inline")]}):
            pass


@pytest.mark.parametrize("bare_run_inline", [True, False], ids=["awaited-here", "own-task"])
async def test_cancelling_the_stream_inside_an_inline_hook_still_cancels_it(
    bare_run_inline: bool,
) -> None:
    """The cancellation lands while our isolation is awaiting the handler: it must pass."""
    started = asyncio.Event()

    class Slow(AsyncCallbackHandler):
        run_inline = bare_run_inline

        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            started.set()
            await asyncio.sleep(30)  # still running when the consumer is cancelled

    safe = harden(Slow(), mode="inline", timeout=60.0)

    async def consume() -> None:
        async for _ in fake_chat_model(500).astream("hi", {"callbacks": [safe]}):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5.0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done and task.cancelled(), "the stream's own cancellation was swallowed"
    assert safe.stats().failed == 0


def test_harden_config_on_lists_and_managers() -> None:
    local, inherited = RecordingHandler(), RecordingHandler()
    manager = CallbackManager(handlers=[local, inherited], inheritable_handlers=[inherited])
    hardened = harden_config({"callbacks": manager, "tags": ["t"]})
    new_manager = hardened["callbacks"]
    assert isinstance(new_manager, BaseCallbackManager) and new_manager is not manager
    assert hardened["tags"] == ["t"]
    safe_local, safe_inherited = new_manager.handlers
    assert safe_local is local and safe_inherited is inherited  # hardened in place
    assert stats(local).mode == stats(inherited).mode == "offload"
    assert new_manager.inheritable_handlers == [safe_inherited]
    assert manager.handlers == [local, inherited]  # the original manager keeps its lists
    again = harden_config(hardened)
    assert again["callbacks"].handlers == new_manager.handlers

    listed = harden_config({"callbacks": [local]})
    assert harden_config(listed)["callbacks"] == listed["callbacks"]
    assert harden_config({}) == {} and harden_config(None) == {}


async def test_harden_config_leaves_langchains_streaming_plumbing_alone() -> None:
    # Constructed inside a running loop: older langchain-core needs one for it.
    from langchain_core.tracers.log_stream import LogStreamCallbackHandler

    plumbing = LogStreamCallbackHandler()
    assert harden_config({"callbacks": [plumbing]})["callbacks"] == [plumbing]
    with pytest.raises(TypeError, match=r"own machinery.*cannot be hardened"):
        harden(plumbing)


@pytest.mark.parametrize("bad", [42, "handler", object(), int])
def test_harden_rejects_what_is_not_a_handler(bad: object) -> None:
    with pytest.raises(TypeError, match="harden\\(\\) expects a LangChain callback handler"):
        harden(bad)


def test_harden_config_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="RunnableConfig"):
        harden_config([RecordingHandler()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a BaseCallbackHandler"):
        harden_config({"callbacks": [print]})
    with pytest.raises(TypeError, match="list of handlers or a callback manager"):
        harden_config({"callbacks": "nope"})
