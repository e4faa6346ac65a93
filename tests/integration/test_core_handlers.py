"""langchain-core's own handlers hardened record exactly what they record bare.

StdOut/StreamingStdOut print, UsageMetadata counts, FileCallbackHandler writes, and the
framework plumbing (``astream_events``/``astream_log``) streams the same with
``safecallbacks.install()`` active as without. Every comparison runs the same scenario
twice, bare and hardened, with real runnables and ``GenericFakeChatModel``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import (
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
    CallbackManagerForChainRun,
    StdOutCallbackHandler,
    StreamingStdOutCallbackHandler,
)
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import tool

import safecallbacks
from tests.integration._compare import assert_same, plain
from tests.integration._models import MetadataChatModel

# --------------------------------------------------------------------------- helpers


class RunRecorder(BaseCallbackHandler):
    """A plain user handler (offloaded in auto mode) recording run names and tokens."""

    def __init__(self) -> None:
        self.names: dict[UUID, str] = {}
        self.events: list[tuple[str, UUID, UUID | None, Any]] = []

    def _start(self, kind: str, name: str, run_id: UUID, parent: UUID | None) -> None:
        self.names[run_id] = name
        self.events.append((kind, run_id, parent, None))

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._start("chain_start", str(kwargs.get("name")), run_id, parent_run_id)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._start("chat_model_start", str(kwargs.get("name")), run_id, parent_run_id)

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self.events.append(("token", kwargs["run_id"], None, token))

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append(("llm_end", run_id, None, plain(response.generations)))

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append(("chain_end", run_id, None, plain(outputs)))

    def report(self) -> list[dict[str, Any]]:
        """Events with run ids replaced by run-name paths (parent links kept structurally)."""

        def path(run_id: UUID | None) -> str | None:
            return None if run_id is None else self.names.get(run_id, "<unknown run>")

        return [
            {"hook": kind, "run": path(run), "parent": path(parent), "data": data}
            for kind, run, parent, data in self.events
        ]


def tool_chain(model: GenericFakeChatModel) -> Runnable[Any, Any]:
    """prompt | model | parser | tool | lambda that reports text: chain, llm and tool hooks."""

    @tool
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    def announce(text: str, run_manager: CallbackManagerForChainRun) -> str:
        run_manager.on_text(f"announcing {text}", end="\n")
        return text + "!"

    prompt = ChatPromptTemplate.from_messages([("human", "say {word}")])
    return (
        prompt
        | model.with_config(run_name="model")
        | StrOutputParser()
        | shout
        | RunnableLambda(announce).with_config(run_name="announce")
    )


def reply_model(count: int = 2) -> GenericFakeChatModel:
    return GenericFakeChatModel(
        messages=iter([AIMessage(content=f"hello there world {i}") for i in range(count)])
    )


# ---------------------------------------------------------------- 1. stdout handlers


def _printed_while_streaming(
    capsys: pytest.CaptureFixture[str], handler: BaseCallbackHandler
) -> dict[str, Any]:
    """What was on stdout when invoke() returned and as each streamed chunk arrived."""
    chain = tool_chain(reply_model())
    capsys.readouterr()
    invoked = chain.invoke({"word": "hi"}, config={"callbacks": [handler]})
    after_invoke = capsys.readouterr().out
    # prompt | model | parser streams token by token: stdout is read at every chunk.
    streaming = ChatPromptTemplate.from_messages([("human", "{word}")]) | reply_model()
    per_chunk: list[tuple[Any, str]] = []
    for chunk in (streaming | StrOutputParser()).stream(
        {"word": "hi"}, config={"callbacks": [handler]}
    ):
        per_chunk.append((chunk, capsys.readouterr().out))
    after_stream = capsys.readouterr().out
    return {
        "invoked": invoked,
        "after_invoke": after_invoke,
        "per_chunk": per_chunk,
        "after_stream": after_stream,
    }


@pytest.mark.parametrize("handler_class", [StdOutCallbackHandler, StreamingStdOutCallbackHandler])
def test_stdout_handlers_print_the_same_by_the_time_the_call_returns(
    capsys: pytest.CaptureFixture[str],
    hardened: Callable[[Any], Any],
    handler_class: type[BaseCallbackHandler],
) -> None:
    bare = _printed_while_streaming(capsys, handler_class())
    printed = [bare["after_invoke"], *(out for _chunk, out in bare["per_chunk"])]
    assert "".join(printed), "the handler printed nothing bare: the scenario is broken"

    handler = hardened(handler_class())
    assert isinstance(handler, handler_class)
    assert safecallbacks.stats(handler).mode == "inline"
    safe = _printed_while_streaming(capsys, handler)

    assert_same(bare, safe)


def test_verbose_configure_does_not_add_a_second_stdout_handler(
    capsys: pytest.CaptureFixture[str], hardened: Callable[[Any], Any]
) -> None:
    def configured(handler: StdOutCallbackHandler) -> tuple[CallbackManager, str]:
        manager = CallbackManager.configure(inheritable_callbacks=[handler], verbose=True)
        capsys.readouterr()
        tool_chain(reply_model()).invoke({"word": "hi"}, config={"callbacks": manager})
        return manager, capsys.readouterr().out

    bare_handler = StdOutCallbackHandler()
    bare_manager, bare_out = configured(bare_handler)
    assert [h for h in bare_manager.handlers if isinstance(h, StdOutCallbackHandler)] == [
        bare_handler
    ]

    safe_handler = hardened(StdOutCallbackHandler())
    safe_manager, safe_out = configured(safe_handler)
    stdouts = [h for h in safe_manager.handlers if isinstance(h, StdOutCallbackHandler)]
    assert len(stdouts) == 1, f"verbose=True added a second StdOutCallbackHandler: {stdouts}"
    assert stdouts[0] is safe_handler
    assert safe_out == bare_out


# ------------------------------------------------------------------ 2. usage metadata

try:
    from langchain_core.callbacks import (
        UsageMetadataCallbackHandler,
        get_usage_metadata_callback,
    )
except ImportError:  # langchain-core < 0.3.49
    UsageMetadataCallbackHandler = None  # type: ignore[assignment,misc]
    get_usage_metadata_callback = None  # type: ignore[assignment]

needs_usage = pytest.mark.skipif(
    UsageMetadataCallbackHandler is None,
    reason="UsageMetadataCallbackHandler needs langchain-core >= 0.3.49",
)

RUNS = 50


def usage_model(runs: int = RUNS, model_name: str = "fake-usage-1") -> MetadataChatModel:
    """A model whose i-th reply reports i-dependent token usage."""
    return MetadataChatModel(
        messages=iter(
            [
                AIMessage(
                    content=f"reply number {i}",
                    usage_metadata={
                        "input_tokens": 3 + i,
                        "output_tokens": 5 + 2 * i,
                        "total_tokens": 8 + 3 * i,
                    },
                    response_metadata={"model_name": model_name},
                )
                for i in range(runs)
            ]
        )
    )


def _sync_usage_runs(handler: Any, how: str) -> list[Any]:
    model = usage_model()
    seen: list[Any] = []
    for _ in range(RUNS):
        if how == "invoke":
            model.invoke("hi", config={"callbacks": [handler]})
        else:
            for _chunk in model.stream("hi", config={"callbacks": [handler]}):
                pass
        seen.append(copy.deepcopy(handler.usage_metadata))
    return seen


async def _async_usage_runs(handler: Any) -> list[Any]:
    model = usage_model()
    seen: list[Any] = []
    for _ in range(RUNS):
        await model.ainvoke("hi", config={"callbacks": [handler]})
        seen.append(copy.deepcopy(handler.usage_metadata))
    return seen


@needs_usage
@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_usage_totals_right_after_each_call(hardened: Callable[[Any], Any], how: str) -> None:
    bare = _sync_usage_runs(UsageMetadataCallbackHandler(), how)
    assert bare[-1]["fake-usage-1"]["total_tokens"] == sum(8 + 3 * i for i in range(RUNS))

    handler = hardened(UsageMetadataCallbackHandler())
    assert isinstance(handler, UsageMetadataCallbackHandler)
    assert safecallbacks.stats(handler).mode == "inline"
    assert_same(bare, _sync_usage_runs(handler, how))


@needs_usage
async def test_usage_totals_right_after_each_ainvoke(hardened: Callable[[Any], Any]) -> None:
    bare = await _async_usage_runs(UsageMetadataCallbackHandler())
    assert bare[-1]["fake-usage-1"]["input_tokens"] == sum(3 + i for i in range(RUNS))

    handler = hardened(UsageMetadataCallbackHandler())
    assert safecallbacks.stats(handler).mode == "inline"
    assert_same(bare, await _async_usage_runs(handler))


def _context_usage(
    harden_cb: Callable[[Any], Any] | None, also_in_config: bool, installed: bool
) -> list[Any]:
    """Totals seen through ``get_usage_metadata_callback()`` after each of 10 calls."""
    model = usage_model(runs=10, model_name="fake-usage-ctx")
    seen: list[Any] = []
    with get_usage_metadata_callback() as cb:
        handler = harden_cb(cb) if harden_cb is not None else cb
        config: RunnableConfig = {"callbacks": [handler]} if also_in_config else {}
        for i in range(10):
            if i % 2:
                model.invoke("hi", config=config)
            else:
                for _chunk in model.stream("hi", config=config):
                    pass
            seen.append(copy.deepcopy(cb.usage_metadata))
    if harden_cb is not None or installed:
        try:
            stats = safecallbacks.stats(cb)
            assert stats.mode == "inline"
            assert stats.emitted > 0, "the hardened cb saw no event"
        finally:
            safecallbacks.close(cb, timeout=5.0)
    return seen


@needs_usage
@pytest.mark.parametrize("also_in_config", [False, True], ids=["context", "context+config"])
@pytest.mark.parametrize("arm", ["by_hand", "install", "install+by_hand"])
def test_get_usage_metadata_callback_is_not_double_counted(arm: str, also_in_config: bool) -> None:
    bare = _context_usage(None, also_in_config, installed=False)
    assert bare[-1]["fake-usage-ctx"]["total_tokens"] == sum(8 + 3 * i for i in range(10))

    by_hand = safecallbacks.harden if "by_hand" in arm else None
    install = "install" in arm
    if install:
        safecallbacks.install()
    try:
        safe = _context_usage(by_hand, also_in_config, installed=install)
    finally:
        if install:
            safecallbacks.uninstall()
    assert_same(bare, safe)


# --------------------------------------------------------------- 3. file handler


try:
    from langchain_core.callbacks import FileCallbackHandler
except ImportError:  # pragma: no cover - very old langchain-core
    FileCallbackHandler = None  # type: ignore[assignment,misc]


@pytest.mark.skipif(
    FileCallbackHandler is None or not hasattr(FileCallbackHandler, "__enter__"),
    reason="FileCallbackHandler is a context manager from langchain-core 0.3.67 on",
)
def test_file_handler_writes_the_same_file(tmp_path: Path) -> None:
    def run(path: Path, harden: bool) -> str:
        handler = FileCallbackHandler(str(path), mode="w")
        if harden:
            handler = safecallbacks.harden(handler)
            assert safecallbacks.stats(handler).mode == "inline"
        with handler as h:
            assert isinstance(h, FileCallbackHandler)
            chain = tool_chain(reply_model())
            chain.invoke({"word": "file"}, config={"callbacks": [h]})
            for _chunk in chain.stream({"word": "file"}, config={"callbacks": [h]}):
                pass
        if harden:
            safecallbacks.close(handler, timeout=5.0)
        return path.read_text(encoding="utf-8")

    bare = run(tmp_path / "bare.log", harden=False)
    assert "Entering new" in bare and "announcing HELLO THERE WORLD 0" in bare
    safe = run(tmp_path / "hardened.log", harden=True)
    assert_same(bare.splitlines(), safe.splitlines())


# ------------------------------------------- 6. astream_events / astream_log plumbing


def _plumbing_classes() -> list[type]:
    classes: list[type] = []
    try:
        from langchain_core.tracers.event_stream import _AstreamEventsCallbackHandler

        classes.append(_AstreamEventsCallbackHandler)
    except ImportError:  # pragma: no cover - private name moved
        pass
    from langchain_core.tracers.log_stream import LogStreamCallbackHandler

    classes.append(LogStreamCallbackHandler)
    return classes


def plumbing_chain(seen: list[list[tuple[str, bool]]]) -> Runnable[Any, Any]:
    """prompt | model | parser, plus a step noting the plumbing handlers it was given."""
    classes = _plumbing_classes()

    def note_handlers(text: str, config: RunnableConfig) -> str:
        callbacks = config.get("callbacks")
        handlers: list[Any] = (
            callbacks.handlers
            if isinstance(callbacks, BaseCallbackManager)
            else list(callbacks or [])
        )
        seen.append(
            [
                (cls.__name__, type(h) is cls)
                for h in handlers
                for cls in classes
                if isinstance(h, cls)
            ]
        )
        return text.upper()

    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")])
    return (
        prompt
        | reply_model(1).with_config(run_name="model", tags=["llm"])
        | StrOutputParser()
        | RunnableLambda(note_handlers).with_config(run_name="note", metadata={"k": "v"})
    ).with_config(run_name="plumbing", tags=["top"])


async def _stream_events(recorder: RunRecorder) -> dict[str, Any]:
    seen: list[list[tuple[str, bool]]] = []
    events = [
        plain(event)
        async for event in plumbing_chain(seen).astream_events(
            {"q": "hi"}, config={"callbacks": [recorder]}, version="v2"
        )
    ]
    # Parent links compared structurally: each parent id becomes that run's name.
    names = {event["run_id"]: event["name"] for event in events}
    for event in events:
        event["parent_ids"] = [names.get(p, "<unknown run>") for p in event["parent_ids"]]
    return {"events": events, "plumbing": seen}


async def _stream_log(recorder: RunRecorder) -> dict[str, Any]:
    seen: list[list[tuple[str, bool]]] = []
    patches = [
        plain(patch.ops)
        async for patch in plumbing_chain(seen).astream_log(
            {"q": "hi"}, config={"callbacks": [recorder]}
        )
    ]
    return {"patches": patches, "plumbing": seen}


@pytest.mark.parametrize("api", ["astream_events", "astream_log"])
async def test_event_streams_are_unchanged_by_install(api: str) -> None:
    produce = _stream_events if api == "astream_events" else _stream_log
    bare_recorder = RunRecorder()
    bare = await produce(bare_recorder)
    assert bare["plumbing"] and all(exact for _name, exact in bare["plumbing"][0])
    assert any(kind == "token" for kind, *_rest in bare_recorder.events)

    safe_recorder = RunRecorder()
    safecallbacks.install()
    try:
        safe = await produce(safe_recorder)
        # The user handler was hardened on its way into the manager (the plumbing was not);
        # uninstall() gives it its class back, so wait for its events before that.
        assert safecallbacks.stats(safe_recorder).mode == "offload"
        assert await safecallbacks.aflush(safe_recorder, timeout=5.0)
    finally:
        safecallbacks.uninstall()
    assert_same(bare, safe)
    assert_same(bare_recorder.report(), safe_recorder.report())
