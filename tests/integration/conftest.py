"""Fixtures the integration tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import safecallbacks


@pytest.fixture
def hardened() -> Iterator[Callable[[Any], Any]]:
    """``harden`` that closes (stops) every handler it hardened when the test ends."""
    made: list[Any] = []

    def _harden(handler: Any) -> Any:
        safe = safecallbacks.harden(handler)
        made.append(safe)
        return safe

    yield _harden
    for safe in made:
        safecallbacks.close(safe, timeout=5.0)
