"""Debian's Prometheus scraping the running platform, with the shipped rules and dashboards:
every dashboard target has data, no alert fires on a healthy platform (also right after a
restart of Prometheus or of a process: new series), and the breaker alert fires within two
minutes for an upstream that hangs.

The file's name puts it first among the e2e tests, on a platform nothing has hurt yet (the
later ones dead-letter messages and break upstreams on purpose, which the rules rightly
report). The rules' unit tests, every rule at its real windows, are
tests/prometheus/alerts.test.yaml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from devstack import GozonProcess
from tests.e2e.conftest import Platform
from tests.e2e.live_prometheus import ROOT, LivePrometheus
from tests.e2e.test_metrics_live import the_spec_scenario
from tests.unit.test_dashboards import BROKER_DASHBOARDS

pytestmark = pytest.mark.e2e

DASHBOARDS = ROOT / "charts" / "gozon" / "dashboards"
# Grafana's variables, as a dashboard over the last few minutes would set them.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "5s"}


def dashboard_targets() -> list[tuple[str, str, str]]:
    """Every target of the Gozon processes' dashboards. The brokers' dashboard is left out:
    its series come from Strimzi's JMX exporter, which this platform's broker has not."""
    targets = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        if path.name in BROKER_DASHBOARDS:
            continue
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                targets.append((path.name, panel["title"], expr))
    return targets


@pytest.fixture(scope="module")
def prometheus(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LivePrometheus]:
    server = LivePrometheus(platform, tmp_path_factory.mktemp("prometheus")).start()
    try:
        yield server
    finally:
        server.stop()


async def no_alert_fires(prometheus: LivePrometheus, during: float) -> None:
    """Polls the alerts for `during` seconds: none may be firing at any poll."""
    deadline = time.monotonic() + during
    while time.monotonic() < deadline:
        firing = await prometheus.alerts("firing")
        assert not firing, [(a["labels"], a["value"]) for a in firing]
        await asyncio.sleep(0.5)


async def test_every_dashboard_target_has_data(
    platform: Platform, prometheus: LivePrometheus
) -> None:
    finished = await the_spec_scenario(platform)
    assert finished["status"] == "FINISHED"
    await prometheus.wait_scraped(samples=5)
    empty = [
        f"{board} / {title}: {expr}"
        for board, title, expr in dashboard_targets()
        if not await prometheus.query(expr)
    ]
    assert not empty, "dashboard targets with no data:\n" + "\n".join(empty)


async def test_no_alert_fires_on_a_healthy_platform_even_after_restarts(
    platform: Platform, prometheus: LivePrometheus
) -> None:
    await prometheus.wait_scraped(samples=3)
    await no_alert_fires(prometheus, during=10)

    # Prometheus restarted: every series is new to its rules' windows
    prometheus.stop()
    prometheus.start()
    await prometheus.wait_scraped(samples=3)
    await no_alert_fires(prometheus, during=10)

    # a relay and a consumer restarted: their counters start again at 0, as new series
    if platform.compose is None:
        for name in ("orders-relay", "payments-consumer"):
            process = platform.processes[name]
            assert isinstance(process, GozonProcess)
            process.kill()
            await asyncio.to_thread(platform.start, name)
        await prometheus.wait_scraped(samples=3)
        await no_alert_fires(prometheus, during=10)


@pytest.fixture
async def payments_api_frozen(platform: Platform) -> AsyncIterator[int]:
    process = platform.processes["payments-api"]
    if not isinstance(process, GozonProcess) or process.process is None:
        pytest.skip("freezes a process of the tests' own (not a compose container)")
    pid = process.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_the_breaker_alert_fires_within_two_minutes_for_an_upstream_that_hangs(
    platform: Platform, prometheus: LivePrometheus, payments_api_frozen: int
) -> None:
    """From the breaker's first step out of CLOSED (which takes the gateway's failure threshold
    of upstream timeouts) to the alert firing: at most two minutes."""
    frozen_at = time.monotonic()
    opened_at: float | None = None
    user = f"alerts-{uuid.uuid4().hex[:8]}"
    states: set[float] = set()

    async def traffic(client: httpx.AsyncClient) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/api/payments/balance", headers={"X-User-Id": user})
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=platform.gateway, timeout=30) as client:
        senders = [asyncio.create_task(traffic(client)) for _ in range(4)]
        try:
            while True:
                for sample in await prometheus.query(
                    'gozon_gateway_breaker_state{upstream="payments"}'
                ):
                    state = float(sample["value"][1])
                    states.add(state)
                    if state > 0 and opened_at is None:
                        opened_at = time.monotonic()
                firing = [
                    a
                    for a in await prometheus.alerts("firing")
                    if a["labels"]["alertname"] == "GozonGatewayBreakerOpen"
                ]
                if firing:
                    break
                now = time.monotonic()
                assert opened_at is not None or now - frozen_at < 120, (
                    "the breaker did not leave CLOSED within 120 s of the freeze"
                )
                assert opened_at is None or now - opened_at < 120, (
                    f"GozonGatewayBreakerOpen not firing 120 s after the breaker opened "
                    f"({now - frozen_at:.0f} s after the freeze); states seen: {sorted(states)}"
                )
                await asyncio.sleep(1)
        finally:
            for sender in senders:
                sender.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
    assert firing[0]["labels"]["upstream"] == "payments"
    # Every sample Prometheus scraped since the freeze, not only those this loop happened to
    # look at: an open spell lasts the breaker's reset time (1 s here), about one scrape.
    since = f"{int(time.monotonic() - frozen_at) + 5}s"
    scraped = await prometheus.api(
        "query", query=f'gozon_gateway_breaker_state{{upstream="payments"}}[{since}]'
    )
    states |= {float(value) for series in scraped["result"] for _, value in series["values"]}
    # the hang made the breaker flap: half-open trials that hang, then open again
    assert {1.0, 2.0} <= states, states


async def test_the_payments_api_answers_through_the_gateway_again_after_the_thaw(
    platform: Platform,
) -> None:
    """(The frozen process resumed: its breaker closes at the next probe, for the tests after.)"""
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=30) as client:
        deadline = time.monotonic() + 120
        while True:
            response = await client.get(
                "/api/payments/balance", headers={"X-User-Id": f"thaw-{uuid.uuid4().hex[:6]}"}
            )
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert response.status_code in (200, 404), response.text
