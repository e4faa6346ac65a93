"""What inline isolation costs a tracer: a hardened ``LangChainTracer`` vs the bare one.

Tracers run inline under ``mode="auto"`` (they stamp times when the hook runs), so
their hardened hook is the bare hook plus the isolation around it. Measured two ways,
configurations interleaved in every repeat so machine noise hits them alike:

* per token: ``run_manager.on_llm_new_token`` in a tight loop (sync and async managers);
* per call: ``(prompt | GenericFakeChatModel | parser).invoke`` with the tracer attached.

The tracer's client points at a closed local port with background batching, as an app
whose collector is down: nothing is sent on the timed path either way.

    python benchmarks/inline_tracer.py [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import _common as c
from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGenerationChunk, LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers import LangChainTracer
from langsmith import Client

KINDS = ("none", "bare", "hardened")


def make_tracer(lib: Any, kind: str) -> list[Any]:
    if kind == "none":
        return []
    client = Client(api_url="http://127.0.0.1:9", api_key="bench", info={})
    tracer = LangChainTracer(client=client, project_name="bench")
    return [lib.harden(tracer) if kind == "hardened" else tracer]


def per_token_sync(lib: Any, kind: str, events: int) -> float:
    manager = CallbackManager.configure(inheritable_callbacks=make_tracer(lib, kind))
    run = manager.on_chat_model_start({"name": "bench"}, [[HumanMessage("hi")]])[0]
    chunk = ChatGenerationChunk(message=AIMessageChunk(content=" tok"))
    emit = run.on_llm_new_token
    gc.collect()
    t0 = time.perf_counter_ns()
    for _ in range(events):
        emit(" tok", chunk=chunk)
    took = (time.perf_counter_ns() - t0) / events
    run.on_llm_end(LLMResult(generations=[[]]))
    return took


async def per_token_async(lib: Any, kind: str, events: int) -> float:
    manager = AsyncCallbackManager.configure(inheritable_callbacks=make_tracer(lib, kind))
    run = (await manager.on_chat_model_start({"name": "bench"}, [[HumanMessage("hi")]]))[0]
    chunk = ChatGenerationChunk(message=AIMessageChunk(content=" tok"))
    emit = run.on_llm_new_token
    gc.collect()
    t0 = time.perf_counter_ns()
    for _ in range(events):
        await emit(" tok", chunk=chunk)
    took = (time.perf_counter_ns() - t0) / events
    await run.on_llm_end(LLMResult(generations=[[]]))
    return took


def per_call(lib: Any, kind: str, calls: int) -> float:
    text = " ".join(f"w{i}" for i in range(20))
    model = GenericFakeChatModel(messages=iter([AIMessage(content=text)] * calls))
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    callbacks = make_tracer(lib, kind)
    gc.collect()
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        chain.invoke({"q": "hi"}, config={"callbacks": callbacks})
    return (time.perf_counter_ns() - t0) / calls


def interleaved(measure: Callable[[str], float], repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(repeats):
        for kind in KINDS:
            samples[kind].append(measure(kind))
    return samples


def main(argv: list[str] | None = None) -> int:
    args = c.base_parser(__doc__.splitlines()[0] if __doc__ else "").parse_args(argv)
    c.quiet_logs(args.show_logs)
    logging.getLogger("langsmith").setLevel(logging.CRITICAL)
    lib = c.load_library()
    if lib is None:
        return 1
    repeats = args.repeats or (3 if args.quick else 15)
    events = 500 if args.quick else 5_000
    calls = 20 if args.quick else 200
    sections = {
        "per token, sync manager (ns)": interleaved(
            lambda kind: per_token_sync(lib, kind, events), repeats
        ),
        "per token, async manager (ns)": interleaved(
            lambda kind: asyncio.run(per_token_async(lib, kind, events)), repeats
        ),
        "per `.invoke()` of prompt | model | parser (ns)": interleaved(
            lambda kind: per_call(lib, kind, calls), repeats
        ),
    }
    rows = []
    for label, samples in sections.items():
        none, bare, hard = (c.median(samples[k]) for k in KINDS)
        rows.append(
            [
                label,
                c.fmt_num(none, 0),
                c.fmt_num(bare, 0),
                c.fmt_num(hard, 0),
                c.fmt_ratio(hard / bare),
                c.verdict(hard / bare <= 1.15),
            ]
        )
    print("## Inline isolation: hardened `LangChainTracer` vs bare\n")
    print(f"{c.environment_line()}; medians of {repeats} interleaved repeats.\n")
    headers = ["measure", "no tracer", "bare tracer", "hardened tracer", "hardened / bare"]
    print(c.md_table([*headers, "goal <= 1.15x"], rows, right=(1, 2, 3, 4)))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
