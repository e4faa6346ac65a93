"""``install()`` and the copies langchain-core makes of a handler it is given.

langchain-core's ``_configure`` replaces every ``LangChainTracer`` of a manager by
``handler.copy_with_metadata_defaults(...)`` (``self.__class__(...)``) when a run has
LangSmith metadata to add, as a chat model invoked directly does. The handler the caller
holds must be hardened before that, so the copies join its family: ``flush`` / ``stats``
on it cover their events, with the options ``install`` chose for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.tracers.langchain import LangChainTracer

import safecallbacks
from safecallbacks.testing import fake_chat_model

TRACER = "langchain_core.tracers.langchain.LangChainTracer"

pytestmark = pytest.mark.skipif(
    not hasattr(LangChainTracer, "copy_with_metadata_defaults"),
    reason="this langchain-core does not copy tracers per run (added in 1.x)",
)
TOKENS = 4
STREAMED_TOKENS = 2 * TOKENS - 1  # the words and the spaces between them


@pytest.fixture
def installed() -> Iterator[None]:
    safecallbacks.install(overrides={TRACER: {"mode": "offload"}})
    try:
        yield
    finally:
        safecallbacks.uninstall()


class CopiedTracer(LangChainTracer):
    """A tracer of our own that langchain-core copies as it copies ``LangChainTracer``.

    No LangSmith client: it records the events it gets in a list its copies share
    (as a ``LangChainTracer``'s copies share its ``run_map``), and copies itself
    with ``self.__class__(...)`` as ``LangChainTracer.copy_with_metadata_defaults`` does.
    """

    def __init__(
        self,
        *,
        tags: list[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        events: list[tuple[str, Any]] | None = None,
        copies: list[CopiedTracer] | None = None,
    ) -> None:
        BaseCallbackHandler.__init__(self)
        self.tags = list(tags or [])
        self.tracing_metadata = dict(metadata) if metadata is not None else None
        self.events: list[tuple[str, Any]] = events if events is not None else []
        self.copies: list[CopiedTracer] = copies if copies is not None else []

    def copy_with_metadata_defaults(
        self, *, metadata: Mapping[str, str] | None = None, tags: list[str] | None = None
    ) -> CopiedTracer:
        made = self.__class__(
            tags=sorted(set(self.tags + (tags or []))),
            metadata={**(metadata or {}), **(self.tracing_metadata or {})},
            events=self.events,
            copies=self.copies,
        )
        self.copies.append(made)
        return made

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.events.append(("start", kwargs["run_id"]))

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.events.append(("token", token))

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.events.append(("end", kwargs["run_id"]))

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.events.append(("error", type(error).__name__))


def as_given(handler: BaseCallbackHandler, shape: str) -> Any:
    if shape == "list":
        return [handler]
    return CallbackManager(handlers=[handler], inheritable_handlers=[handler])


def run_model(callbacks: Any) -> None:
    model = fake_chat_model(TOKENS, replies=2)
    model.invoke("hi", config={"callbacks": callbacks})
    for _ in model.stream("hi", config={"callbacks": callbacks}):
        pass


def hooks_of(events: list[tuple[str, Any]]) -> list[str]:
    return [hook for hook, _ in events]


@pytest.mark.parametrize("shape", ["list", "manager"])
def test_copies_of_a_handler_given_to_a_chat_model_join_its_family(
    installed: None, shape: str
) -> None:
    bare = CopiedTracer()
    safecallbacks.uninstall()
    run_model(as_given(bare, shape))  # what langchain-core does with it, not installed
    assert bare.copies, "langchain-core no longer copies tracers: the test proves nothing"
    safecallbacks.install(overrides={TRACER: {"mode": "offload"}})

    tracer = CopiedTracer()
    run_model(as_given(tracer, shape))
    assert isinstance(tracer, CopiedTracer) and type(tracer) is not CopiedTracer
    assert len(tracer.copies) == len(bare.copies)
    for made in tracer.copies:
        assert type(made) is type(tracer), "copied from the hardened handler"
        assert safecallbacks.stats(made).mode == "offload"
    assert safecallbacks.flush(tracer, 5.0) is True
    stats = safecallbacks.stats(tracer)
    assert stats.mode == "offload"
    assert stats.emitted > 0 and stats.emitted == stats.delivered == len(tracer.events)
    assert stats.failed == stats.dropped == 0
    # Nothing doubled: the same events as bare, each delivered once.
    assert hooks_of(tracer.events) == hooks_of(bare.events)
    assert hooks_of(tracer.events).count("token") == STREAMED_TOKENS

    safecallbacks.uninstall()
    assert type(tracer) is CopiedTracer
    with pytest.raises(TypeError):
        safecallbacks.stats(tracer)


def test_a_handler_met_again_is_hardened_once(installed: None) -> None:
    tracer = CopiedTracer()
    run_model([tracer])
    hardened_class = type(tracer)
    safecallbacks.install(overrides={TRACER: {"mode": "offload"}})  # idempotent
    run_model([tracer])
    assert type(tracer) is hardened_class
    assert safecallbacks.flush(tracer, 5.0)
    stats = safecallbacks.stats(tracer)
    assert stats.emitted == stats.delivered == len(tracer.events)
    assert hooks_of(tracer.events).count("start") == 4


# -- the real LangChainTracer, sending to a local fake LangSmith ------------------------
langsmith = pytest.importorskip("langsmith")

from tests.integration._langsmith_server import merge_runs, post_counts  # noqa: E402
from tests.integration.test_langsmith import (  # noqa: E402,F401 - server is a fixture
    flush_client,
    new_client,
    server,
)


def test_langchain_tracer_given_to_a_chat_model_is_hardened_with_its_copies(
    installed: None,
    server: Any,  # noqa: F811 - the fixture imported above
) -> None:
    client = new_client(server)
    tracer = LangChainTracer(client=client)
    copies: list[LangChainTracer] = []
    original = LangChainTracer.copy_with_metadata_defaults

    def spy(self: LangChainTracer, **kwargs: Any) -> LangChainTracer:
        made = original(self, **kwargs)
        copies.append(made)
        return made

    LangChainTracer.copy_with_metadata_defaults = spy  # type: ignore[method-assign]
    try:
        run_model([tracer])
    finally:
        LangChainTracer.copy_with_metadata_defaults = original  # type: ignore[method-assign]

    assert copies, "langchain-core no longer copies tracers: the test proves nothing"
    assert type(tracer) is not LangChainTracer and isinstance(tracer, LangChainTracer)
    assert all(type(made) is type(tracer) for made in copies)
    assert safecallbacks.flush(tracer, 5.0) is True
    stats = safecallbacks.stats(tracer)
    assert stats.mode == "offload"
    assert stats.emitted > 0 and stats.emitted == stats.delivered
    assert stats.failed == stats.dropped == 0 and not stats.errors

    flush_client(client)
    ops = server.take()
    runs = merge_runs(ops)
    assert [run["run_type"] for run in runs.values()] == ["llm", "llm"]
    assert all(count == 1 for count in post_counts(ops).values()), "a run posted twice"
    assert all(run.get("end_time") for run in runs.values())

    safecallbacks.uninstall()
    assert type(tracer) is LangChainTracer
    with pytest.raises(TypeError):
        safecallbacks.flush(tracer)
