"""A hardened handler pickles, so it can be handed to a spawn or forkserver process.

What arrives is hardened with the options it had and an engine of its own (its
first event makes it): counts and pending events stay with the original.
"""

from __future__ import annotations

import multiprocessing
import pickle
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

import safecallbacks
from safecallbacks.testing import fake_chat_model, options_of

TOKENS = 5
STREAMED = 2 * TOKENS - 1  # the words and the spaces between them


class Collector(BaseCallbackHandler):
    def __init__(self, label: str) -> None:
        self.label = label
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def stream_through(handler: BaseCallbackHandler) -> int:
    list(fake_chat_model(TOKENS).stream("hi", config={"callbacks": [handler]}))
    return len(handler.tokens)  # type: ignore[attr-defined]


def test_a_hardened_handler_round_trips_through_pickle_hardened_with_its_options() -> None:
    original = safecallbacks.harden(Collector("audit"), mode="offload", max_queue=77)
    stream_through(original)
    assert safecallbacks.flush(original, 5.0)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is type(original) and isinstance(copy, Collector)
    assert (copy.label, len(copy.tokens)) == ("audit", STREAMED)
    stream_through(copy)
    assert safecallbacks.flush(copy, 5.0)
    copied, kept = safecallbacks.stats(copy), safecallbacks.stats(original)
    assert (copied.mode, copied.delivered, len(copy.tokens)) == ("offload", STREAMED, 2 * STREAMED)
    assert kept.delivered == STREAMED  # the copy is not the original's family
    assert options_of(copy).max_queue == 77


def test_a_handler_hardened_by_class_round_trips_through_pickle() -> None:
    made = safecallbacks.harden(Collector, mode="inline")("made")
    copy = pickle.loads(pickle.dumps(made))
    assert type(copy) is type(made)
    assert stream_through(copy) == STREAMED
    assert safecallbacks.stats(copy).mode == "inline"


def streamed_in_child(handler: BaseCallbackHandler) -> tuple[bool, int, int]:
    count = stream_through(handler)
    flushed = safecallbacks.flush(handler, 5.0)
    return flushed, count, safecallbacks.stats(handler).delivered


def test_a_hardened_handler_can_be_handed_to_a_spawned_process() -> None:
    handler = safecallbacks.harden(Collector("spawned"), mode="offload")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        flushed, count, delivered = pool.apply_async(streamed_in_child, (handler,)).get(60)
    assert (flushed, delivered) == (True, STREAMED)
    assert count <= STREAMED  # read before the flush: offloaded, maybe not all there yet
