"""Field-by-field comparison of what a handler recorded bare and hardened.

Ids, timestamps and durations differ between two runs of the same thing; everything
else (names, parent links, inputs, outputs, attributes, events) must be equal.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
HEX_ID_RE = re.compile(r"\b[0-9a-f]{16,32}\b")
ISO_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?")
DOTTED_ORDER_RE = re.compile(r"\d{8}T\d{6,}Z[0-9a-f-]+")

VOLATILE_KEYS = frozenset(
    {
        "id",
        "run_id",
        "trace_id",
        "span_id",
        "parent_id",
        "parent_run_id",
        "parent_span_id",
        "start_time",
        "end_time",
        "time",
        "timestamp",
        "dotted_order",
        "session_id_uuid",
        "latency",
    }
)


def plain(value: Any) -> Any:
    """``value`` as plain data (dicts, lists, str...) so ``scrub`` can see every field."""
    if isinstance(value, BaseModel):
        return {"__type__": type(value).__name__, **plain(value.model_dump())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, BaseException):
        return {"__error__": type(value).__name__, "args": plain(value.args)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "value") and hasattr(value, "id"):  # langgraph Interrupt
        return {"__type__": type(value).__name__, "value": plain(value.value), "id": value.id}
    return repr(value)


def scrub(value: Any, volatile: Iterable[str] = VOLATILE_KEYS) -> Any:
    """``value`` with ids, timestamps and other per-run noise replaced by placeholders."""
    keys = frozenset(volatile)
    if isinstance(value, Mapping):
        return {
            str(k): ("<volatile>" if str(k) in keys else scrub(v, keys)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [scrub(v, keys) for v in value]
    if isinstance(value, str):
        text = DOTTED_ORDER_RE.sub("<dotted>", value)
        text = UUID_RE.sub("<uuid>", text)
        text = ISO_TIME_RE.sub("<time>", text)
        return HEX_ID_RE.sub("<hex>", text)
    if isinstance(value, float):
        return round(value, 6)
    return value


def differences(bare: Any, hardened: Any, path: str = "$") -> list[str]:
    """Every place where two scrubbed structures differ, as readable paths."""
    if isinstance(bare, Mapping) and isinstance(hardened, Mapping):
        found: list[str] = []
        for key in sorted(set(bare) | set(hardened), key=str):
            if key not in bare:
                found.append(f"{path}.{key}: only hardened has it ({hardened[key]!r:.120})")
            elif key not in hardened:
                found.append(f"{path}.{key}: only bare has it ({bare[key]!r:.120})")
            else:
                found.extend(differences(bare[key], hardened[key], f"{path}.{key}"))
        return found
    if isinstance(bare, list) and isinstance(hardened, list):
        if len(bare) != len(hardened):
            return [f"{path}: {len(bare)} items bare, {len(hardened)} hardened"]
        found = []
        for index, (a, b) in enumerate(zip(bare, hardened, strict=True)):
            found.extend(differences(a, b, f"{path}[{index}]"))
        return found
    if bare != hardened:
        return [f"{path}: bare {bare!r:.120} != hardened {hardened!r:.120}"]
    return []


def assert_same(bare: Any, hardened: Any, volatile: Iterable[str] = VOLATILE_KEYS) -> None:
    """Fail with every differing field listed when the scrubbed structures differ."""
    found = differences(scrub(bare, volatile), scrub(hardened, volatile))
    assert not found, "hardened recorded different data than bare:\n" + "\n".join(found[:40])
