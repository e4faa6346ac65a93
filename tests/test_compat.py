"""Every private or version-specific API in ``_compat`` still means what we rely on."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import pytest
from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForChainRun,
)

from safecallbacks import _compat, _policy
from tests._imports import import_or_skip


def test_streaming_handler_base_marks_langchains_stream_plumbing() -> None:
    from langchain_core.tracers.log_stream import LogStreamCallbackHandler

    assert _compat.STREAMING_HANDLER_BASE is not None
    assert _compat.STREAMING_HANDLER_BASE in LogStreamCallbackHandler.__mro__
    assert _policy.is_plumbing(LogStreamCallbackHandler)


def test_async_manager_code_is_langchains_event_runner() -> None:
    import langchain_core.callbacks.manager as manager

    assert _compat.ASYNC_MANAGER_CODE is manager._ahandle_event_for_handler.__code__


class Probe(BaseCallbackHandler):
    run_inline = True

    def __init__(self) -> None:
        self.answers: list[bool] = []

    def on_text(self, text: str, **kwargs: Any) -> None:
        self.answers.append(_compat.called_by_async_manager())


def _sync_run(probe: Probe) -> CallbackManagerForChainRun:
    return CallbackManagerForChainRun(run_id=uuid4(), handlers=[probe], inheritable_handlers=[])


def test_called_by_async_manager_tells_the_two_managers_apart() -> None:
    probe = Probe()
    _sync_run(probe).on_text("sync")

    async def from_async() -> None:
        run = AsyncCallbackManagerForChainRun(
            run_id=uuid4(), handlers=[probe], inheritable_handlers=[]
        )
        await run.on_text("async")
        _sync_run(probe).on_text("sync manager inside a loop")

    asyncio.run(from_async())
    assert probe.answers == [False, True, False]


def test_configure_function_is_what_managers_are_built_by() -> None:
    import langchain_core.callbacks.manager as manager

    assert _compat.configure_function() is manager._configure
    built = CallbackManager.configure(inheritable_callbacks=[Probe()])
    assert isinstance(built, CallbackManager)


class Maker:
    def make(self) -> object:
        return _compat.constructing_self(depth=0)


def test_constructing_self_finds_the_method_owner() -> None:
    maker = Maker()
    assert maker.make() is maker
    assert _compat.constructing_self(depth=0) is None  # a test function has no self


class Copier:
    def copy_with_metadata_defaults(self) -> object:
        return _compat.copying_self(depth=0)

    def for_request(self) -> object:
        return _compat.copying_self(depth=0)


def test_copying_self_finds_only_a_copying_methods_owner() -> None:
    copier = Copier()
    assert copier.copy_with_metadata_defaults() is copier
    assert copier.for_request() is None


def test_get_running_loop_is_none_outside_a_loop() -> None:
    assert _compat.get_running_loop() is None
    assert asyncio.run(_loop_inside()) is True


async def _loop_inside() -> bool:
    return _compat.get_running_loop() is asyncio.get_running_loop()


def test_langgraphs_plumbing_names_are_where_the_rule_expects_them() -> None:
    import_or_skip("langgraph.pregel")  # skips only where LangGraph cannot load at all
    from langgraph.pregel._messages import StreamMessagesHandler
    from langgraph.pregel._retry import _IdleProgressCallbackHandler

    assert _policy.is_plumbing(_IdleProgressCallbackHandler)
    assert _policy.is_plumbing(StreamMessagesHandler)


def test_v2_streaming_base_exists_on_langchain_core_1() -> None:
    import langchain_core

    if int(langchain_core.__version__.split(".")[0]) >= 1:
        assert _compat.V2_STREAMING_BASE is not None


def test_count_value_reads_an_itertools_count_without_consuming() -> None:
    import itertools

    counter = itertools.count()
    for _ in range(5):
        next(counter)
    assert _compat.count_value(counter) == 5
    assert _compat.count_value(counter) == 5  # reading took nothing
    assert next(counter) == 5


def test_sdk_configured_tells_the_placeholder_provider_from_a_real_one() -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    placeholder = metrics.get_meter_provider()
    expected = not isinstance(placeholder, _compat._PLACEHOLDER_PROVIDERS)
    assert _compat.sdk_configured() is expected
    assert _compat._proxy_meter_provider() is not None, "opentelemetry-api moved its proxy"
    assert not isinstance(MeterProvider(), _compat._PLACEHOLDER_PROVIDERS)


def test_a_lock_held_elsewhere_is_usable_after_reinit() -> None:
    import threading

    for lock in (threading.Lock(), threading.RLock()):
        holder = threading.Thread(target=lock.acquire)
        holder.start()
        holder.join()  # held by a thread that is gone, as after a fork
        _compat.reinit_lock_after_fork(lock)
        assert lock.acquire(timeout=1.0)
        lock.release()


def test_a_missing_streaming_base_fails_at_import_not_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_compat, "_streaming_name", lambda name: None)
    with pytest.raises(ImportError, match="_StreamingCallbackHandler"):
        _compat._required_streaming_base()
