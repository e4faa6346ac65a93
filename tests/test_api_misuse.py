"""Calls that cannot work where they are made fail loudly, naming what to use instead."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from langchain_core.callbacks import BaseCallbackHandler

import safecallbacks
from safecallbacks import SafeHandler, harden
from safecallbacks.testing import (
    AsyncRecordingHandler,
    BlockingHandler,
    RecordingHandler,
    fake_chat_model,
)


async def test_sync_flush_inside_a_running_loop_names_aflush() -> None:
    for handler in (harden(AsyncRecordingHandler()), harden(RecordingHandler())):
        async for _ in fake_chat_model(3).astream("hi", config={"callbacks": [handler]}):
            pass
        with pytest.raises(RuntimeError, match=r"await safecallbacks\.aflush\(handler\)"):
            safecallbacks.flush(handler)
        with pytest.raises(RuntimeError, match=r"await safecallbacks\.aclose\(handler\)"):
            handler.close()
        assert await safecallbacks.aflush(handler, 5.0)  # the alternative works
        stats = safecallbacks.stats(handler)
        assert stats.delivered == stats.emitted > 0 and stats.dropped == 0


class _AwaitingRecorder(AsyncRecordingHandler):
    """Awaits in every hook, as a handler with a network client does: a slow drain."""

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        await asyncio.sleep(0.001)
        await super().on_llm_new_token(token, **kwargs)


async def test_sync_with_in_async_code_is_refused_before_the_block_and_drops_nothing() -> None:
    handler = harden(_AwaitingRecorder())
    ran = False
    with pytest.raises(RuntimeError, match="async with handler"):  # noqa: SIM117
        with handler:
            ran = True
    assert not ran, "refused only after the block ran: its events would be cut off"
    async for _ in fake_chat_model(20).astream("hi", config={"callbacks": [handler]}):
        pass
    assert await safecallbacks.aflush(handler, 5.0)
    stats = safecallbacks.stats(handler)
    assert stats.dropped == 0 and stats.delivered == stats.emitted == len(handler.calls) == 41
    async with harden(_AwaitingRecorder()) as fine:
        async for _ in fake_chat_model(20).astream("hi", config={"callbacks": [fine]}):
            pass
    assert safecallbacks.stats(fine).dropped == 0
    assert safecallbacks.stats(fine).delivered == len(fine.calls) == 41


def test_a_flush_that_times_out_says_so_with_the_pending_count() -> None:
    handler = harden(BlockingHandler(), mode="offload")
    with structlog.testing.capture_logs() as logs:
        for _ in fake_chat_model(3).stream("hi", config={"callbacks": [handler]}):
            pass
        try:
            assert safecallbacks.flush(handler, 0.05) is False
        finally:
            handler.release()
    timed_out = [entry for entry in logs if entry["event"] == "flush_timed_out"]
    assert len(timed_out) == 1 and timed_out[0]["pending"] >= 1, logs
    assert safecallbacks.flush(handler, 5.0)


@pytest.mark.parametrize("bad", [None, 42, "handler", object(), int])
def test_harden_names_what_it_got_instead_of_a_handler(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"harden\(\) expects a LangChain callback handler"):
        harden(bad)


def test_max_queue_bound_is_exact_for_one_emitting_thread() -> None:
    handler = harden(BlockingHandler(), mode="offload", max_queue=5, breaker=None)
    try:
        for _ in fake_chat_model(10).stream("hi", config={"callbacks": [handler]}):
            pass
        stats = safecallbacks.stats(handler)
        assert stats.queue_depth <= 5 and stats.queue_high_water <= 5, stats
    finally:
        handler.release()
    assert safecallbacks.flush(handler, 5.0)


class InstanceHook(BaseCallbackHandler):
    """Sets its hook on the instance: LangChain calls that, never the class's."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.on_llm_new_token = self._write

    def _write(self, token: str, **kwargs: Any) -> None:
        self.written.append(token)


def test_harden_refuses_a_hook_set_on_the_instance_naming_it() -> None:
    handler = InstanceHook()
    with pytest.raises(TypeError, match=r"InstanceHook\.on_llm_new_token is set on the instance"):
        harden(handler)
    assert type(handler) is InstanceHook  # left as it was


class OnAttributes(BaseCallbackHandler):
    """``on_*`` attributes that are not hooks: a callback of its own, a count."""

    def __init__(self) -> None:
        self.on_done = lambda: None
        self.on_llm_new_token_count = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.on_llm_new_token_count += 1


def test_on_attributes_that_are_not_hooks_do_not_stop_hardening() -> None:
    handler = harden(OnAttributes(), mode="offload")
    list(fake_chat_model(3).stream("hi", config={"callbacks": [handler]}))
    assert safecallbacks.flush(handler, 5.0) and handler.on_llm_new_token_count == 5


class SafeInstanceHook(SafeHandler):
    def __init__(self) -> None:
        self.written: list[str] = []
        self.on_llm_new_token = self._write

    def _write(self, token: str, **kwargs: Any) -> None:
        self.written.append(token)


def test_a_hardened_class_refuses_an_instance_that_sets_a_hook_on_itself() -> None:
    # Its engine exists before __init__ runs: construction itself refuses it.
    with pytest.raises(TypeError, match=r"SafeInstanceHook\.on_llm_new_token is set on the"):
        SafeInstanceHook()
    made = harden(InstanceHook)
    with pytest.raises(TypeError, match=r"InstanceHook\.on_llm_new_token is set on the"):
        made()
    handler = harden(OnAttributes)()  # on_* attributes that are not hooks are fine
    list(fake_chat_model(3).stream("hi", config={"callbacks": [handler]}))
    assert safecallbacks.flush(handler, 5.0)


def test_install_leaves_a_handler_with_an_instance_hook_bare_and_says_why() -> None:
    handler = InstanceHook()
    safecallbacks.install()
    try:
        with structlog.testing.capture_logs() as logs:
            chunks = list(fake_chat_model(3).stream("hi", config={"callbacks": [handler]}))
    finally:
        safecallbacks.uninstall()
    assert len(chunks) == 5 and type(handler) is InstanceHook and len(handler.written) == 5
    said = [entry for entry in logs if entry["event"] == "install_could_not_harden"]
    assert len(said) == 1 and "on_llm_new_token is set on the instance" in said[0]["error"]
