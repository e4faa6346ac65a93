"""Callbacks handed from worker threads to a loop: each runs once, in order, and a burst
wakes the loop once (``safecallbacks._wakeups``, what async settles are resolved with)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from safecallbacks._wakeups import call_soon_from_thread, pending_loops


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def counting_wakeups(monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop) -> list[int]:
    calls: list[int] = []
    real = loop.call_soon_threadsafe

    def counted(callback: Callable[..., Any], *args: Any) -> Any:
        calls.append(1)
        return real(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    return calls


def from_thread(work: Callable[[], None]) -> None:
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


def test_a_burst_from_a_thread_wakes_the_loop_once_and_keeps_its_order(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakeups = counting_wakeups(monkeypatch, loop)
    ran: list[int] = []
    done = loop.create_future()

    def burst() -> None:
        for n in range(100):
            call_soon_from_thread(loop, partial(ran.append, n))
        call_soon_from_thread(loop, lambda: done.set_result(None))

    async def main() -> None:
        from_thread(burst)  # the loop is held meanwhile: the whole burst is pending
        await asyncio.wait_for(done, 10)

    loop.run_until_complete(main())
    assert ran == list(range(100))
    assert len(wakeups) == 1
    assert pending_loops() == 0


def test_callbacks_after_a_wakeup_ran_get_a_new_one(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakeups = counting_wakeups(monkeypatch, loop)
    ran: list[str] = []

    async def main() -> None:
        for name in ("first", "second"):
            arrived = asyncio.Event()
            from_thread(partial(call_soon_from_thread, loop, partial(ran.append, name)))
            call_soon_from_thread(loop, arrived.set)
            await asyncio.wait_for(arrived.wait(), 10)

    loop.run_until_complete(main())
    assert ran == ["first", "second"]
    assert len(wakeups) == 2


def test_a_closed_loop_is_neither_called_nor_kept() -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    ran: list[int] = []
    call_soon_from_thread(closed, lambda: ran.append(1))
    assert ran == [] and pending_loops() == 0


def test_a_loop_closed_with_its_call_pending_is_let_go(loop: asyncio.AbstractEventLoop) -> None:
    never_run = asyncio.new_event_loop()
    call_soon_from_thread(never_run, lambda: None)
    assert pending_loops() == 1
    never_run.close()  # its call never ran
    done = loop.create_future()
    call_soon_from_thread(loop, lambda: done.set_result(None))
    assert pending_loops() == 1  # only the open loop's
    loop.run_until_complete(asyncio.wait_for(done, 10))
    assert pending_loops() == 0


def test_a_wakeup_cut_off_by_ctrl_c_is_sent_with_the_next_callback(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loop.call_soon_threadsafe
    cut: list[int] = []

    def interrupted_once(callback: Callable[..., Any], *args: Any) -> Any:
        if not cut:
            cut.append(1)
            raise KeyboardInterrupt
        return real(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", interrupted_once)
    ran: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        call_soon_from_thread(loop, lambda: ran.append("cut off"))
    done = loop.create_future()
    call_soon_from_thread(loop, partial(ran.append, "next"))
    call_soon_from_thread(loop, partial(done.set_result, None))
    loop.run_until_complete(asyncio.wait_for(done, 10))
    assert ran == ["cut off", "next"]
    assert pending_loops() == 0


def test_a_raising_callback_does_not_stop_the_others(
    loop: asyncio.AbstractEventLoop,
) -> None:
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    ran: list[str] = []
    done = loop.create_future()

    def boom() -> None:
        raise ValueError("boom")

    def burst() -> None:
        call_soon_from_thread(loop, boom)
        call_soon_from_thread(loop, partial(ran.append, "after"))
        call_soon_from_thread(loop, partial(done.set_result, None))

    async def main() -> None:
        from_thread(burst)
        await asyncio.wait_for(done, 10)

    loop.run_until_complete(main())
    assert ran == ["after"]
    assert [type(c["exception"]) for c in reported] == [ValueError]
