"""Grading a ``check``'s runs into a verdict, and printing the report (text or JSON data).

The rule is ``_check.RULE``: break (an exception reaches the consumer, a stream ends
short), stall (timeout, a longer gap, a slow p99, a blocked event loop), or fine.
Nothing here runs on the token path.
"""

from __future__ import annotations

from typing import Any

from ._check import GAP_MS, LAG_MS, MODELS, P99_MS, RULE, Runs
from ._hooks import implemented_hooks, is_async_callable
from ._measure import (
    API_NAMES,
    APIS,
    NOT_RUN,
    StreamRun,
    fmt_s,
    table,
)
from ._policy import dotted_name

# --------------------------------------------------------------------------- the verdict


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _handler_time(runs: Runs) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if runs.timed:
        found["measured_by"] = "timing each hook call of the bare handler, in the caller"
        for api in APIS:
            times = runs.times[api]
            found[api] = {
                "events": len(times.samples),
                "p50_ms": _ms(times.quantile(0.5)),
                "p99_ms": _ms(times.quantile(0.99)),
                "max_ms": _ms(max(times.samples, default=0.0)),
            }
        return found
    found["measured_by"] = "the hardened handler's stats().handler_time (class not timeable)"
    for api in APIS:
        stats = runs.streams["paced", api, "hardened"].stats
        summary = stats.handler_time if stats is not None else None
        found[api] = {
            "events": summary.count if summary else 0,
            "p50_ms": _ms(summary.p50) if summary else 0.0,
            "p99_ms": _ms(summary.p99) if summary else 0.0,
            "max_ms": _ms(summary.max) if summary else 0.0,
        }
    return found


def _stream_row(key: tuple[str, str, str], run: StreamRun) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": key[0],
        "api": key[1],
        "handler": key[2],
        "chunks": run.chunks,
        "expected": run.total,
        "ended": run.ended,
        "total_ms": _ms(run.elapsed),
        "last_chunk_ms": _ms(run.to_last_chunk),
        "longest_gap_ms": _ms(run.longest_gap),
        "log_lines": run.log_lines,
    }
    if run.stats is not None:
        names = ("emitted", "delivered", "failed", "dropped", "skipped", "pending")
        row["stats"] = {n: getattr(run.stats, n) for n in names}
        row["stats"]["errors"] = dict(run.stats.errors)
        row["stats"]["flushed"] = run.flushed
    return row


def _where(kind: str, api: str) -> str:
    return f"{'paced' if kind == 'paced' else 'CPU-bound'} {API_NAMES[api]}"


def grade(spec: str, runs: Runs) -> dict[str, Any]:
    """The report of one check, as one JSON-able object (also what the text shows)."""
    breaks: list[str] = []
    stalls: list[str] = []
    notes: list[str] = []
    for kind in MODELS:
        for api in APIS:
            none, bare = runs.streams[kind, api, "none"], runs.streams[kind, api, "bare"]
            hardened = runs.streams[kind, api, "hardened"]
            where = _where(kind, api)
            if bare.error == NOT_RUN:
                continue
            if bare.timed_out:
                stalls.append(f"{where}: {bare.error}")
            elif bare.died:
                breaks.append(
                    f"{where}: the stream died after {bare.chunks} of {bare.total} "
                    f"chunks: {bare.error}"
                )
            elif bare.cut_short:
                breaks.append(
                    f"{where}: the stream ended after {bare.chunks} of {bare.total} "
                    "chunks with no error (a silently truncated answer)"
                )
            if not bare.timed_out and bare.longest_gap - none.longest_gap > GAP_MS / 1e3:
                stalls.append(
                    f"{where}: longest gap between chunks {fmt_s(bare.longest_gap)}, "
                    f"{fmt_s(none.longest_gap)} without the handler"
                )
            if hardened.died or hardened.cut_short:
                notes.append(f"hardened {where} ended {hardened.ended}")
    handler_time = _handler_time(runs)
    for api in APIS:
        if handler_time[api]["p99_ms"] > P99_MS:
            stalls.append(
                f"handler time per event p99 {handler_time[api]['p99_ms']:.3g} ms on "
                f"{API_NAMES[api]} (above {P99_MS:g} ms)"
            )
    lag = runs.streams["paced", "async", "bare"].loop_lag
    base_lag = runs.streams["paced", "async", "none"].loop_lag or 0.0
    blocked = lag is not None and lag - base_lag > LAG_MS / 1e3
    if blocked and lag is not None:
        stalls.append(
            f"it blocked the event loop: a 1 ms ticker was up to {fmt_s(lag)} late "
            f"({fmt_s(base_lag)} without the handler)"
        )
    raised: list[dict[str, Any]] = [
        {
            "hook": hook,
            "error": error,
            "count": count,
            "example": times.first[hook, error],
            "api": api,
        }
        for api, times in runs.times.items()
        for (hook, error), count in sorted(times.raised.items())
    ]
    if raised and not breaks:
        swallowed = sum(r["count"] for r in raised)
        logged = sum(runs.streams[k, a, "bare"].log_lines for k in MODELS for a in APIS)
        notes.append(
            f"it raised {swallowed} times; LangChain caught them (raise_error=False) "
            f"and logged {logged} WARNING lines"
        )
    if not any(handler_time[api]["events"] for api in APIS) and runs.timed:
        notes.append(
            "none of its hooks fired: a chat model stream calls on_chat_model_start (or "
            "on_llm_start), on_llm_new_token and on_llm_end; chains and tools call others"
        )
    if runs.printed:
        notes.append(f"it printed {runs.printed} lines to stdout (kept out of this report)")
    if runs.offload_differs:
        notes.append(
            "offloaded, what it holds right after a call differs from inline ("
            + ", ".join(runs.offload_differs[:5])
            + "): keep it inline (mode='inline' or register_inline)"
        )
    if runs.mode == "inline":
        notes.append(
            "auto runs it inline, in the caller: hardened, its exceptions are isolated "
            "but its time still counts on the stream"
        )
    code = 1 if breaks or stalls else 0
    verdict = " and ".join(
        word for word, hit in (("would break", breaks), ("would stall", stalls)) if hit
    )
    return {
        "target": spec,
        "handler": dotted_name(runs.cls),
        "hooks": {
            hook: "async" if is_async_callable(value) else "sync"
            for hook, value in implemented_hooks(runs.cls).items()
        },
        "auto_mode": runs.mode,
        "auto_reason": runs.mode_reason,
        "offload_differs": runs.offload_differs,
        "verdict": f"{verdict} a stream bare" if verdict else "ok",
        "exit_code": code,
        "breaks": breaks,
        "stalls": stalls,
        "notes": notes,
        "handler_time": handler_time,
        "raised": raised,
        "event_loop": {
            "max_lag_ms": _ms(lag or 0.0),
            "no_handler_max_lag_ms": _ms(base_lag),
            "blocked": blocked,
        },
        "streams": [
            _stream_row(key, runs.streams[key])
            for kind in MODELS
            for api in APIS
            for key in ((kind, api, "none"), (kind, api, "bare"), (kind, api, "hardened"))
        ],
        "model": {"tokens": runs.cfg.tokens, "interval_s": runs.cfg.interval},
        "thresholds": {
            "gap_ms": GAP_MS,
            "p99_ms": P99_MS,
            "loop_lag_ms": LAG_MS,
            "timeout_s": runs.cfg.timeout,
        },
        "rule": RULE,
    }


# --------------------------------------------------------------------------- the text


def render(report: dict[str, Any]) -> str:
    """The report as a person reads it: who, per-event cost, what it raised, the streams."""
    hooks = ", ".join(f"{h} ({kind})" for h, kind in report["hooks"].items()) or "none"
    if len(report["hooks"]) > 4:
        kinds = list(report["hooks"].values())
        hooks = f"{len(kinds)}: {kinds.count('sync')} sync, {kinds.count('async')} async"
    model = report["model"]
    out = [
        f"safecallbacks check {report['target']}",
        f"  handler    {report['handler']}",
        f"  hooks      {hooks}",
        f"  auto mode  {report['auto_mode']} ({report['auto_reason']})",
        f"  streams    paced: {model['tokens']} tokens, one every {model['interval_s'] * 1e3:g} ms;"
        " CPU-bound: GenericFakeChatModel, no pauses",
        "",
        f"Handler time per event ({report['handler_time']['measured_by']}):",
    ]
    rows: list[tuple[str, ...]] = [("", "events", "p50", "p99", "max")]
    for api in APIS:
        t = report["handler_time"][api]
        rows.append(
            (
                API_NAMES[api],
                str(t["events"]),
                *(fmt_s(t[k] / 1e3) for k in ("p50_ms", "p99_ms", "max_ms")),
            )
        )
    out.append(table(rows).rstrip("\n"))
    out.append("Raised: " + ("; ".join(_raised_text(report["raised"])) or "nothing"))
    loop = report["event_loop"]
    out.append(
        f"Event loop: a 1 ms ticker beside the bare .astream() was up to "
        f"{fmt_s(loop['max_lag_ms'] / 1e3)} late ({fmt_s(loop['no_handler_max_lag_ms'] / 1e3)}"
        f" with no handler): {'BLOCKED' if loop['blocked'] else 'not blocked'}"
    )
    out += [
        "",
        "Streams (what the consumer saw; total includes a root run's end waiting for the",
        "backlog, up to settle):",
    ]
    rows = [("stream", "handler", "chunks", "ended", "last chunk", "total", "longest gap", "stats")]
    for s in report["streams"]:
        stats = s.get("stats")
        rows.append(
            (
                _where(s["model"], s["api"]) if s["handler"] == "none" else "",
                s["handler"],
                f"{s['chunks']}/{s['expected']}",
                s["ended"],
                fmt_s(s["last_chunk_ms"] / 1e3),
                fmt_s(s["total_ms"] / 1e3),
                fmt_s(s["longest_gap_ms"] / 1e3),
                _stats_cell(stats),
            )
        )
    out.append(table(rows).rstrip("\n"))
    out.append("")
    verdict = report["verdict"]
    out.append(
        f"Verdict: {verdict.upper() if verdict != 'ok' else 'OK'} (exit {report['exit_code']})"
    )
    out += [f"  - {line}" for line in report["breaks"] + report["stalls"]]
    out += [f"  note: {line}" for line in report["notes"]]
    return "\n".join(out) + "\n"


def _stats_cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return ""
    names = ("delivered", "failed", "dropped", "skipped", "pending")
    shown = [f"{stats[n]} {n}" for n in names if stats[n] or n == "delivered"]
    return ", ".join(shown) + ("" if stats["flushed"] else " (flush timed out)")


def _raised_text(raised: list[dict[str, Any]]) -> list[str]:
    """One phrase per (hook, error type), with its count on each api."""
    merged: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in raised:
        merged.setdefault((row["hook"], row["error"]), []).append(row)
    return [
        f"{hook} raised {rows[0]['example']} "
        + ", ".join(f"{r['count']}x on {API_NAMES[r['api']]}" for r in rows)
        for (hook, _), rows in merged.items()
    ]
