"""Every process's `/metrics`, live: the names the dashboards and alert rules query exist, and
the spec's scenario moves the counters it should.

Other e2e tests share the platform but run one at a time, so a before/after pair of scrapes
around this test's own scenario isolates its effects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gozon.contracts import ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC
from gozon.processes import PROCESSES
from tests.e2e.conftest import Platform
from tests.e2e.test_order_payment_flow import deposit, final_order, new_user
from tests.unit.test_dashboards import family_of, metric_names_used

pytestmark = pytest.mark.e2e


class Scrape:
    """One process's exposition: family types and samples, as prometheus_client parses them."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend((s.name, s.labels, s.value) for s in family.samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and labels.items() <= sample_labels.items()
        )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def scrape_all(client: httpx.AsyncClient, platform: Platform) -> dict[str, Scrape]:
    async def one(name: str) -> Scrape:
        response = await client.get(platform.metrics_url(name))
        assert response.status_code == 200, f"{name}: {response.status_code}"
        return Scrape(response.text)

    names = [p.name for p in PROCESSES]
    scrapes = await asyncio.gather(*(one(name) for name in names))
    return dict(zip(names, scrapes, strict=True))


# What the scenario should move: (process, series, labels the samples must have).
WATCHED: dict[str, tuple[str, str, dict[str, str]]] = {
    "paid": ("payments-consumer", "gozon_payment_outcomes_total", {"outcome": "paid"}),
    "orders published": ("orders-relay", "gozon_outbox_published_total", {}),
    "payments published": ("payments-relay", "gozon_outbox_published_total", {}),
    "payments consumer processed": (
        "payments-consumer",
        "gozon_consumer_messages_total",
        {"topic": ORDER_CREATED_TOPIC, "outcome": "processed"},
    ),
    "orders consumer processed": (
        "orders-consumer",
        "gozon_consumer_messages_total",
        {"topic": PAYMENT_PROCESSED_TOPIC, "outcome": "processed"},
    ),
}


def deltas(before: Mapping[str, Scrape], after: Mapping[str, Scrape]) -> dict[str, float]:
    return {
        what: after[process].value(series, **labels) - before[process].value(series, **labels)
        for what, (process, series, labels) in WATCHED.items()
    }


async def the_spec_scenario(platform: Platform) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=120) as gateway:
        user = new_user()
        await deposit(gateway, user, "5000")
        response = await gateway.post(
            "/api/orders",
            headers={"X-User-Id": user, "Content-Type": "application/json"},
            content='{"amount": 1500.99, "description": "Тестовый заказ"}'.encode(),
        )
        assert response.status_code == 201, response.text
        return await final_order(gateway, user, response.json()["id"])


async def test_every_metric_in_the_dashboards_and_alerts_is_in_a_live_scrape(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    scrapes = await scrape_all(client, platform)
    missing = {
        name: "no process exposes it"
        for name in sorted(metric_names_used())
        if all(family_of(name, scrape.types) is None for scrape in scrapes.values())
    }
    assert not missing, f"named in charts/gozon/dashboards but never scraped: {missing}"


async def test_the_gateway_serves_its_metrics_on_its_side_port_only(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    public = await client.get(f"{platform.gateway}/metrics")
    assert public.status_code == 404
    assert public.headers["content-type"] == "application/problem+json"
    side = await client.get(platform.metrics_url("gateway"))
    assert side.status_code == 200
    assert "gozon_gateway_breaker_state" in Scrape(side.text).types


async def test_the_spec_scenario_shows_in_every_process_metrics(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    before = await scrape_all(client, platform)
    finished = await the_spec_scenario(platform)
    assert finished["status"] == "FINISHED"

    # The status is visible before each process has counted its part (a counter moves just
    # after its transaction or broker ack), so poll the scrapes for a moment.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        moved = deltas(before, await scrape_all(client, platform))
        if all(delta >= 1 for delta in moved.values()) or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)

    assert moved["paid"] == 1, moved
    assert moved["orders published"] >= 1, moved
    assert moved["payments published"] >= 1, moved
    assert moved["payments consumer processed"] >= 1, moved
    assert moved["orders consumer processed"] >= 1, moved
