"""The Streamlit page ``test_streamlit`` runs under ``AppTest``: a chain streamed into the page.

``render`` is the body of the app script. It builds ``prompt | chat model | parser | tool``,
attaches one handler that writes to the page (bare, ``harden()``-ed or under
``safecallbacks.install()``), runs the chain with ``invoke``/``stream``/``astream``
(``asyncio.run`` in the script thread) and writes the answer below the handler's output.

Streamlit keeps the session of a script run on the script's thread (a thread attribute read
by ``get_script_run_ctx()``), not in a context variable: every ``st.*`` call the handler
makes on another thread raises ``NoSessionContext``. Two handlers:

- ``library``: ``StreamlitCallbackHandler`` (langchain-community's; Streamlit's own
  ``streamlit.external.langchain`` is used instead when it imports), expanders per thought;
- ``app``: the ``StreamHandler`` applications write (``on_llm_new_token`` re-renders the
  text so far into an ``st.empty()``), defined here, outside site-packages.

What the test cannot read from the page (the handler's own state, ``safecallbacks.stats``)
is left in ``LAST_RUN``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import streamlit as st
from langchain_community.callbacks.streamlit import StreamlitCallbackHandler
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import tool

import safecallbacks
from tests.integration._models import MetadataChatModel

REPLY = "the quick brown fox jumps over the lazy dog"

# What the last script run left behind: the handler (hardened or not), its state, its stats.
LAST_RUN: dict[str, Any] = {}


class StreamingChatModel(MetadataChatModel):
    """A provider-like model built with ``streaming=True``: ``invoke`` streams tokens too."""

    streaming: bool = False


class StreamHandler(BaseCallbackHandler):
    """The handler Streamlit apps define to show tokens as they arrive."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self.text = ""

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.text += token
        self.container.markdown(self.text)


@tool
def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


def to_tool_input(text: str) -> dict[str, str]:
    return {"text": text}


def make_chain() -> Runnable[Any, Any]:
    """prompt | streaming chat model | parser | lambda | tool: llm and tool hooks, tokens."""
    model = StreamingChatModel(messages=iter([AIMessage(content=REPLY)]), streaming=True)
    prompt = ChatPromptTemplate.from_messages([("human", "say {topic}")])
    return (
        prompt
        | model
        | StrOutputParser()
        | RunnableLambda(to_tool_input, name="to_tool_input")
        | shout
    )


def make_handler(kind: str) -> BaseCallbackHandler:
    """A fresh handler writing into a fresh container of the page."""
    if kind == "library":
        return StreamlitCallbackHandler(st.container())
    if kind == "app":
        return StreamHandler(st.empty())
    raise ValueError(kind)


def handler_state(handler: Any) -> dict[str, Any]:
    """What the handler itself holds after the run (labels of its thoughts, streamed text)."""
    if isinstance(handler, StreamHandler):
        return {"text": handler.text}
    current = handler._current_thought
    return {
        "completed": [thought.container.label for thought in handler._completed_thoughts],
        "current": None if current is None else current.container.label,
        "history": handler._history_container is not None,
    }


def run_chain(method: str, chain: Runnable[Any, Any], config: RunnableConfig) -> Any:
    value = {"topic": "hi"}
    if method == "invoke":
        return chain.invoke(value, config=config)
    if method == "stream":
        return list(chain.stream(value, config=config))
    if method == "astream":

        async def collect() -> list[Any]:
            return [chunk async for chunk in chain.astream(value, config=config)]

        return asyncio.run(collect())
    raise ValueError(method)


@contextlib.contextmanager
def attached(attach: str) -> Iterator[None]:
    """``safecallbacks.install()`` for the duration when ``attach`` asks for it."""
    if attach != "install":
        yield
        return
    safecallbacks.install()
    try:
        yield
    finally:
        safecallbacks.uninstall()


def render(kind: str, attach: str, method: str, flush: bool) -> None:
    """The app: a title, the handler's output, the chain's answer, a closing caption."""
    LAST_RUN.clear()
    st.title("safecallbacks on Streamlit")
    handler = make_handler(kind)
    if attach == "harden":
        handler = safecallbacks.harden(handler)
    LAST_RUN["handler"] = handler
    with attached(attach):
        output = run_chain(method, make_chain(), {"callbacks": [handler]})
        # Read before uninstall() gives the handler its class back (flushing it first).
        if flush:
            LAST_RUN["flushed"] = safecallbacks.flush(handler, timeout=5.0)
        # Under install() the handler was hardened in place: stats() reads it through the
        # same reference. Bare, stats() refuses (TypeError).
        with contextlib.suppress(TypeError):
            LAST_RUN["stats"] = safecallbacks.stats(handler)
        LAST_RUN["state"] = handler_state(handler)
    st.markdown(f"**Answer:** {output!r}")
    st.caption("done")
