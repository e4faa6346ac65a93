"""Bad options are rejected at construction, with a message naming the option."""

from __future__ import annotations

from typing import Any

import pytest

from safecallbacks import Breaker, SafeHandler, harden, harden_config
from safecallbacks.testing import RecordingHandler, options_of

BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"mode": "fast"}, ValueError, "mode"),
    ({"max_queue": 0}, ValueError, "max_queue"),
    ({"max_queue": 1.5}, TypeError, "max_queue"),
    ({"max_queue": True}, TypeError, "max_queue"),
    ({"on_full": "drop"}, ValueError, "on_full"),
    ({"block_timeout": -1}, ValueError, "block_timeout"),
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": float("inf")}, ValueError, "timeout"),
    ({"timeout": "5"}, TypeError, "timeout"),
    ({"breaker": 5}, TypeError, "breaker"),
    ({"breaker": (0, 1.0)}, ValueError, "breaker failures"),
    ({"breaker": (3, -1.0)}, ValueError, "breaker reset"),
    ({"name": ""}, ValueError, "name"),
    ({"log_payloads": "yes"}, TypeError, "log_payloads"),
    ({"exit_timeout": -1}, ValueError, "exit_timeout"),
    ({"max_qeue": 5}, TypeError, "unknown option"),
]


@pytest.mark.parametrize(("options", "error", "names"), BAD)
def test_every_entry_point_rejects_bad_options(
    options: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        harden(RecordingHandler(), **options)
    with pytest.raises(error, match=names):
        harden(**options)
    with pytest.raises(error, match=names):
        harden_config({"callbacks": []}, **options)
    if "max_qeue" not in options:
        with pytest.raises(error, match=names):
            SafeHandler(**options)


def test_good_options_are_kept() -> None:
    safe = harden(
        RecordingHandler(),
        mode="inline",
        max_queue=7,
        on_full="block",
        block_timeout=0.5,
        timeout=2,
        breaker=(3, 1.5),
        name="audit",
    )
    options = options_of(safe)
    assert (options.mode, options.max_queue, options.on_full) == ("inline", 7, "block")
    assert options.breaker == Breaker(failures=3, reset=1.5)
    assert options.timeout == 2.0 and safe.stats().handler == "audit"
    assert harden(RecordingHandler(), breaker=None).stats().breaker == "disabled"
