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


def test_options_are_defined_once_and_every_signature_shows_them() -> None:
    import dataclasses
    import inspect
    import typing

    import safecallbacks
    from safecallbacks import _options

    names = [spec.name for spec in dataclasses.fields(_options.Options)]
    assert list(_options.OPTION_NAMES) == names
    # The keyword types offered to type checkers are the dataclass's, name for name.
    assert list(typing.get_type_hints(_options.OptionValues)) == names
    defaults = _options.make_options()
    for public in (
        safecallbacks.harden,
        safecallbacks.harden_config,
        safecallbacks.install,
        safecallbacks.SafeHandler,
    ):
        parameters = inspect.signature(public).parameters
        for name in names:
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, (public, name)
            assert parameters[name].default == getattr(defaults, name), (public, name)


def test_mypy_rejects_an_option_value_that_is_not_allowed(tmp_path: Any) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    script = tmp_path / "user_code.py"
    script.write_text(
        "from safecallbacks import harden\n"
        "from safecallbacks.testing import RecordingHandler\n"
        "good = harden(RecordingHandler(), mode='inline', max_queue=5)\n"
        "bad = harden(RecordingHandler(), mode='fast')\n"
    )
    out, _, status = mypy_api.run(["--strict", "--no-incremental", str(script)])
    assert status == 1, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "user_code.py:4:" in errors[0], out
