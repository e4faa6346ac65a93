"""Shared fixtures: every test gets real langchain-core, nothing is mocked.

Shared helpers and constants are in ``_support.py``, the child-interpreter runner in
``_child.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests._support import gate_releaser

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    max_examples=60,
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    max_examples=25,
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def releases() -> Iterator[list[Any]]:
    """Blocking handlers appended here are released at teardown, whatever happened."""
    yield from gate_releaser([])
