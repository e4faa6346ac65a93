"""Skipping tests whose optional package cannot be imported here.

``pytest.importorskip`` only catches ``ImportError``; a package built for a newer
langchain-core can fail on import with anything (LangGraph raises ``TypeError`` on
langchain-core 0.3), and that must skip the test, not error the run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def import_or_skip(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        pytest.skip(
            f"{name} cannot be imported with the installed packages ({type(exc).__name__}: {exc})",
            allow_module_level=True,
        )


def require_langchain_core(minimum: str, package: str) -> None:
    """Skip the module where ``package`` needs a newer langchain-core than is installed.

    Such a package may still import, then misbehave in ways that say nothing about us.
    """
    import langchain_core

    def parts(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())

    if parts(langchain_core.__version__) < parts(minimum):
        pytest.skip(
            f"{package} needs langchain-core >= {minimum}, "
            f"{langchain_core.__version__} is installed",
            allow_module_level=True,
        )
