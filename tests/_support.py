"""Helpers and constants shared by the test files (real langchain-core, nothing mocked).

Fixtures built on them (``releases``) live in ``conftest.py``; running code in a child
interpreter is ``_child.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    Call,
    RecordingHandler,
    async_wait_until,
    fake_chat_model,
)

# The hooks a chat model's stream fires, in order.
START, TOKEN, END = "on_chat_model_start", "on_llm_new_token", "on_llm_end"
STREAM_HOOKS = (START, TOKEN, END, "on_llm_error")

KINDS = ["sync", "async"]
"""Every offload property is checked with a sync and an ``async def`` handler."""

PROBE = contextvars.ContextVar("offload_probe", default=None)
"""A context variable the tests set before streaming and the handlers read."""


def token_of(call: Call) -> str:
    """The token of an ``on_llm_new_token`` call (LangChain passes it by keyword)."""
    if "token" in call.kwargs:
        return str(call.kwargs["token"])
    return str(call.args[0])


def tokens_of(calls: Iterable[Call]) -> list[str]:
    return [token_of(c) for c in calls if c.hook == TOKEN]


def hooks_of(calls: Iterable[Call]) -> list[str]:
    return [c.hook for c in calls]


def expected_hooks(chunks: int) -> list[str]:
    """What one chat-model stream of ``chunks`` chunks fires, in order."""
    return [START, *([TOKEN] * chunks), END]


def chunk_count(words: int) -> int:
    """``fake_chat_model(words)`` streams the words and the spaces between them."""
    return 2 * words - 1


WORDS = 20
CHUNKS = chunk_count(WORDS)  # 39: the words and the spaces between them
EVENTS = CHUNKS + 2  # plus on_chat_model_start and on_llm_end
MARGIN = 0.75  # slack for "returns within its timeout" on a loaded 2-core machine
WATCHDOG = 15.0  # a test that would otherwise hang releases its handler after this long


def by_run(calls: Iterable[Any]) -> dict[Any, list[Any]]:
    """Group calls (anything with a ``run_id``) by run, keeping their order."""
    grouped: dict[Any, list[Any]] = {}
    for call in calls:
        grouped.setdefault(call.run_id, []).append(call)
    return grouped


@dataclass(frozen=True)
class Seen:
    """One delivery as a probe handler saw it."""

    hook: str
    token: str | None
    run_id: Any
    tags: tuple[str, ...]
    thread: str
    loop: asyncio.AbstractEventLoop | None
    probe: Any


def _seen(hook: str, kwargs: dict[str, Any]) -> Seen:
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    return Seen(
        hook=hook,
        token=kwargs.get("token"),
        run_id=kwargs.get("run_id"),
        tags=tuple(kwargs.get("tags") or ()),
        thread=threading.current_thread().name,
        loop=loop,
        probe=PROBE.get(),
    )


class SyncProbe(BaseCallbackHandler):
    """A sync handler recording where and in which context each stream event arrived."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()

    def _note(self, hook: str, kwargs: dict[str, Any]) -> None:
        item = _seen(hook, kwargs)
        with self._lock:
            self.seen.append(item)

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self._note(START, kwargs)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self._note(TOKEN, {"token": token, **kwargs})

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._note(END, kwargs)


class AsyncProbe(AsyncCallbackHandler):
    """The ``async def`` twin of ``SyncProbe``."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.seen.append(_seen(START, kwargs))

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.seen.append(_seen(TOKEN, {"token": token, **kwargs}))

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.seen.append(_seen(END, kwargs))


class AsyncBlockingHandler(AsyncCallbackHandler):
    """An async handler that records tokens but parks in its ``after+1``-th token until released.

    It waits without blocking its event loop (an async sink stuck on I/O), so other
    tasks of that loop keep running.
    """

    def __init__(self, after: int = 0) -> None:
        self.calls: list[Call] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.after = after
        self._seen = 0

    def release(self) -> None:
        self.gate.set()

    async def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.calls.append(Call(START, (serialized, messages), kwargs))

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self._seen += 1
        if self._seen > self.after:
            self.entered.set()
            while not self.gate.is_set():
                await asyncio.sleep(0.002)
        self.calls.append(Call(TOKEN, (), {"token": token, **kwargs}))

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.calls.append(Call(END, (response,), kwargs))


def gate_releaser(handlers: list[Any]) -> Iterator[list[Any]]:
    """Fixture body: yields a list; every blocking handler put in it is released at teardown."""
    yield handlers
    for handler in handlers:
        handler.release()


def recorder(kind: str) -> RecordingHandler | AsyncRecordingHandler:
    return RecordingHandler() if kind == "sync" else AsyncRecordingHandler()


def probe(kind: str) -> SyncProbe | AsyncProbe:
    return SyncProbe() if kind == "sync" else AsyncProbe()


def blocker(kind: str, after: int = 0) -> BlockingHandler | AsyncBlockingHandler:
    return BlockingHandler(after=after) if kind == "sync" else AsyncBlockingHandler(after=after)


def watchdog(handler: BlockingHandler | AsyncBlockingHandler) -> threading.Timer:
    """Release ``handler`` after WATCHDOG seconds so a broken library fails instead of hanging."""
    timer = threading.Timer(WATCHDOG, handler.release)
    timer.daemon = True
    timer.start()
    return timer


def check_complete(handler: Any, chunks: list[str]) -> None:
    """The handler saw one whole ``fake_chat_model(WORDS)`` stream of ``chunks``, in order."""
    assert hooks_of(handler.calls) == expected_hooks(CHUNKS)
    assert tokens_of(handler.calls) == chunks


def stream_parked(safe: Any, stuck: Any, words: int = WORDS) -> list[str]:
    """Stream; at the first chunk wait until the handler is parked in token 0, then go on."""
    chunks = []
    for chunk in fake_chat_model(words).stream("hi", config={"callbacks": [safe]}):
        if not chunks:
            assert stuck.entered.wait(10), "the handler never parked"
        chunks.append(str(chunk.content))
    return chunks


async def astream_parked(safe: Any, stuck: Any, words: int = WORDS) -> list[str]:
    chunks = []
    async for chunk in fake_chat_model(words).astream("hi", config={"callbacks": [safe]}):
        if not chunks:
            assert await async_wait_until(stuck.entered.is_set, 10), "the handler never parked"
        chunks.append(str(chunk.content))
    return chunks
