"""The Grafana dashboard ``dashboards/safecallbacks.json`` against a real Prometheus.

The FastAPI example serves its OpenTelemetry metrics at ``/metrics`` (the OpenTelemetry
Prometheus exporter); a real Prometheus (Debian's ``prometheus`` package) scrapes it every
second while a short load goes through a failing and a slow handler; then every panel's
PromQL is evaluated through Prometheus's HTTP API and must return series for both handlers.
Everything binds to 127.0.0.1, every wait has a deadline, every process is stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._http_support import (
    LOOPBACK,
    REPO_ROOT,
    free_port,
    load_example,
    port_accepts,
    run_uvicorn,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

DASHBOARD_PATH = REPO_ROOT / "dashboards" / "safecallbacks.json"
PROMETHEUS_CANDIDATES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")

FAILING = "RaisingHandler"  # the example's handler=raise: fails on every token
SLOW = "StallingHandler"  # the example's handler=stall: blocks for 2 s once per request
HANDLERS = {"raise": FAILING, "stall": SLOW}

# Grafana's template variables, as Grafana would expand them for "All" and a short range.
TEMPLATE_VALUES = {"$__rate_interval": "30s", "$handler": ".+"}

WORDS = 40  # 79 events per request: 40 words and the 39 spaces between them
DELAY_MS = 5.0
REQUESTS_PER_KIND = 3
FLUSH_TIMEOUT = 5.0  # more than the slow handler's 2 s stall
WAIT_TIMEOUT = 30.0


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return loaded


def panel_targets() -> list[tuple[str, str, str]]:
    """``(panel title, refId, expr)`` for every target of every panel (rows included)."""
    found = []
    panels = list(load_dashboard()["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
        for target in panel.get("targets", []):
            found.append((panel["title"], target.get("refId", "?"), target.get("expr", "")))
    return found


def expand(expr: str) -> str:
    """Substitute Grafana's template variables (longest name first: ``$__rate_interval``)."""
    for name in sorted(TEMPLATE_VALUES, key=len, reverse=True):
        expr = expr.replace(name, TEMPLATE_VALUES[name])
    return expr


# --------------------------------------------------------------------------------------------
# The dashboard file on its own
# --------------------------------------------------------------------------------------------


def test_dashboard_json_is_valid_and_every_panel_has_a_query() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert "label_values(" in variables["handler"]["definition"]
    assert variables["handler"]["includeAll"] and variables["handler"]["multi"]

    panels = dashboard["panels"]
    assert len(panels) >= 7
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            expr = target.get("expr", "")
            assert expr.strip(), f"panel {panel['title']!r} target {target.get('refId')} no expr"
            assert "$handler" in expr, f"{panel['title']!r} ignores the handler variable"
            assert expr.count("(") == expr.count(")"), expr
            # Only the variables the test (and Grafana) expand.
            leftover = set(re.findall(r"\$\w+", expand(expr)))
            assert not leftover, f"{panel['title']!r}: unexpanded {leftover}"


def test_example_runs_without_the_prometheus_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the exporter (or prometheus_client) there is no /metrics; streaming is as before."""
    module = load_example()
    for name in ("opentelemetry.exporter.prometheus", "prometheus_client"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    assert module.prometheus_meter_provider() is None
    with (
        run_uvicorn(module.create_app()) as app,
        httpx.Client(base_url=app.base_url, timeout=15.0) as client,
    ):
        assert client.get("/metrics").status_code == 404
        response = client.get("/safe/stream", params={"handler": "raise", "words": 5})
        assert (response.status_code, response.text) == (200, module.make_text(5))


# --------------------------------------------------------------------------------------------
# A real Prometheus
# --------------------------------------------------------------------------------------------


def find_prometheus() -> str | None:
    for candidate in PROMETHEUS_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("prometheus")


PROMETHEUS_CONF = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: safecallbacks-example
    metrics_path: /metrics
    static_configs:
      - targets: ["{host}:{app_port}"]
"""


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    client: httpx.Client

    def get(self, path: str, **params: str) -> Any:
        response = self.client.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def target_up(self) -> bool:
        for target in self.get("/api/v1/targets", state="active")["activeTargets"]:
            if target["health"] == "up" and not target["lastScrape"].startswith("0001"):
                return True
        return False

    def last_scrape(self) -> float:
        """When the newest scrape of the example happened (seconds since the epoch)."""
        # On a selector, not an expression: timestamp(up == 1) would be the evaluation time.
        found = self.query('timestamp(up{job="safecallbacks-example"})')
        return float(found[0]["value"][1]) if found else 0.0

    def describe(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # Prometheus's graceful shutdown
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


@contextlib.contextmanager
def run_prometheus(binary: str, app_port: int, *, attempts: int = 3) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port, private config and storage, scraping ``app_port``."""
    with tempfile.TemporaryDirectory(prefix="safecallbacks-prometheus-") as tmp:
        root = Path(tmp)
        config = root / "prometheus.yml"
        config.write_text(PROMETHEUS_CONF.format(host=LOOPBACK, app_port=app_port))
        log = root / "prometheus.log"
        for attempt in range(attempts):
            port = free_port()
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={root / 'data'}",
                        f"--web.listen-address={LOOPBACK}:{port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_until(
                    lambda port=port, process=process: (
                        port_accepts(port) or process.poll() is not None
                    ),
                    timeout=WAIT_TIMEOUT,
                    what=f"prometheus on {LOOPBACK}:{port}",
                )
                if process.poll() is not None:  # the port was taken meanwhile, say
                    if attempt + 1 == attempts:
                        raise RuntimeError(f"prometheus exited:\n{log.read_text()[-3000:]}")
                    continue
                with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=5.0) as client:
                    yield Prometheus(process=process, port=port, log=log, client=client)
                return
            finally:
                _stop(process)


# --------------------------------------------------------------------------------------------
# The example app with a meter provider exporting to Prometheus
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def global_meter_provider(provider: Any) -> Iterator[None]:
    """Make ``provider`` the global meter provider for a while, then put back the previous one.

    ``metrics.set_meter_provider`` can be called once per process; swapping the API's global
    directly leaves that call available to the tests that need it (``test_visible.py``).
    """
    from opentelemetry.metrics import _internal as otel_metrics

    previous = otel_metrics._METER_PROVIDER
    otel_metrics._METER_PROVIDER = provider
    try:
        yield
    finally:
        otel_metrics._METER_PROVIDER = previous
        provider.shutdown()  # also takes the exporter's collector out of prometheus_client


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    binary = find_prometheus()
    if binary is None:
        message = (
            "prometheus is not installed (expected /usr/bin/prometheus); "
            "install it with: apt-get update && apt-get install -y prometheus"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@dataclass
class Scraped:
    prometheus: Prometheus
    records: list[Any]


def _drive(base_url: str, kind: str) -> tuple[int, str]:
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(15.0)) as client:
        response = client.get(
            "/safe/stream", params={"handler": kind, "words": WORDS, "delay_ms": DELAY_MS}
        )
        return response.status_code, response.text


@pytest.fixture(scope="module")
def scraped(prometheus_binary: str) -> Iterator[Scraped]:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    module = load_example()
    provider = module.prometheus_meter_provider()
    assert provider is not None, "the example found no OpenTelemetry Prometheus exporter"
    records: list[Any] = []  # they keep the handlers (and their queue-depth gauges) alive
    lock = threading.Lock()

    def keep(record: Any) -> None:
        with lock:
            records.append(record)

    with (
        global_meter_provider(provider),
        run_uvicorn(module.create_app(flush_timeout=FLUSH_TIMEOUT, on_record=keep)) as app,
        run_prometheus(prometheus_binary, app.port) as prometheus,
    ):
        wait_until(
            prometheus.target_up, timeout=WAIT_TIMEOUT, interval=0.2, what="a scrape of /metrics"
        )
        emitted: dict[str, float] = {}

        def totals() -> dict[str, float]:
            found = prometheus.query("sum by (handler) (safecallbacks_events_total)")
            return {series["metric"]["handler"]: float(series["value"][1]) for series in found}

        def wave(requests_per_kind: int) -> None:
            """Stream through each handler kind at once; wait until Prometheus has it all."""
            kinds = [kind for kind in HANDLERS for _ in range(requests_per_kind)]
            first = len(records)
            with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
                responses = list(pool.map(lambda kind: _drive(app.base_url, kind), kinds))
            expected_body = module.make_text(WORDS)
            for status, body in responses:
                assert (status, body) == (200, expected_body)
            for record in records[first:]:  # flushed: the slow handler's events delivered too
                assert record.finished.wait(FLUSH_TIMEOUT + 5.0), record
                assert record.flushed and record.stats is not None, record
                name = HANDLERS[record.kind]
                emitted[name] = emitted.get(name, 0) + record.stats.emitted
            # The counters reach OpenTelemetry when a delivered batch is committed, a moment
            # after the flush: wait until Prometheus has scraped every event, then for one
            # more scrape, so that each series has two samples of its final value.
            wait_until(
                lambda: totals() == emitted,
                timeout=WAIT_TIMEOUT,
                interval=0.2,
                what=f"Prometheus to count every event ({emitted})",
            )
            counted_at = prometheus.last_scrape()
            wait_until(
                lambda: prometheus.last_scrape() > counted_at,
                timeout=WAIT_TIMEOUT,
                interval=0.2,
                what="one more scrape",
            )

        # A first request per kind makes the series; Prometheus only sees a counter grow
        # (rate > 0) from its second sample on, so the rest of the load comes after.
        wave(1)
        wave(REQUESTS_PER_KIND)
        yield Scraped(prometheus=prometheus, records=records)


# --------------------------------------------------------------------------------------------
# Every panel's query against the real data
# --------------------------------------------------------------------------------------------


def test_metrics_endpoint_publishes_the_package_metrics(scraped: Scraped) -> None:
    names = {
        series["__name__"]
        for series in scraped.prometheus.get("/api/v1/series", **{"match[]": '{handler!=""}'})
    }
    for name in (
        "safecallbacks_events_total",
        "safecallbacks_handler_duration_seconds_bucket",
        "safecallbacks_delivery_lag_seconds_bucket",
        "safecallbacks_breaker_state_changes_total",
        "safecallbacks_queue_depth",
    ):
        assert name in names, sorted(names)
    outcomes = {
        (series["metric"]["handler"], series["metric"]["outcome"])
        for series in scraped.prometheus.query("safecallbacks_events_total")
    }
    assert {(FAILING, "failed"), (SLOW, "delivered")} <= outcomes, outcomes


@pytest.mark.parametrize(
    ("title", "ref", "expr"), panel_targets(), ids=[f"{t}/{r}" for t, r, _ in panel_targets()]
)
def test_panel_query_returns_series_for_each_handler(
    scraped: Scraped, title: str, ref: str, expr: str
) -> None:
    query = expand(expr)
    result = scraped.prometheus.query(query)
    assert result, f"{title} ({ref}): no series for {query}\n{scraped.prometheus.describe()}"
    handlers = {series["metric"].get("handler") for series in result}
    assert set(HANDLERS.values()) <= handlers, f"{title} ({ref}): {handlers} from {query}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(value) for value in values), f"{title} ({ref}): only {values}"


def test_panels_show_what_the_load_did(scraped: Scraped) -> None:
    """The figures behind the panels: the failing handler fails, the slow one is slow."""
    query = scraped.prometheus.query

    def by_handler(expr: str) -> dict[str, float]:
        return {s["metric"]["handler"]: float(s["value"][1]) for s in query(expand(expr))}

    events = 'safecallbacks_events_total{handler=~"$handler"}'
    total = by_handler(f"sum by (handler) ({events})")
    assert total[SLOW] == (1 + REQUESTS_PER_KIND) * (2 * WORDS - 1), total
    per_second = by_handler(f"sum by (handler) (rate({events}[$__rate_interval]))")
    assert per_second[SLOW] > 0 and per_second[FAILING] > 0, per_second
    failed = by_handler(f'sum by (handler) ({events[:-1]}, outcome="failed"}})')
    assert failed[FAILING] > 0 and SLOW not in failed, failed
    opened = by_handler(
        'sum by (handler) (safecallbacks_breaker_state_changes_total{state="open"})'
    )
    assert opened[FAILING] >= 1, opened
    # Events queued behind the 2 s stall waited more than a second to be delivered.
    # (The stalled event itself may not be in the handler-time histogram: a large batch
    # records a sample of its events.)
    lag_p99 = by_handler(
        "histogram_quantile(0.99, sum by (handler, le) "
        "(rate(safecallbacks_delivery_lag_seconds_bucket[$__rate_interval])))"
    )
    assert lag_p99[SLOW] >= 1.0, lag_p99
    assert lag_p99[FAILING] < 1.0, lag_p99
    depth = by_handler(
        'max by (handler) (max_over_time(safecallbacks_queue_depth{handler=~"$handler"}[5m]))'
    )
    assert depth[SLOW] >= 1, depth  # the stream went on while the handler was stuck
