"""Prometheus in the compose stack scrapes every Gozon process and has the shipped alert rules."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gozon.processes import PROCESSES

pytestmark = pytest.mark.compose

ALERTS = Path(__file__).resolve().parents[2] / "charts" / "gozon" / "dashboards" / "alerts.yaml"


async def api(client: httpx.AsyncClient, path: str) -> Any:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_every_gozon_process_is_a_target_that_is_up(prometheus: httpx.AsyncClient) -> None:
    wanted = {p.name for p in PROCESSES}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # a target is "unknown" until its first scrape (every 5 s)
        targets = (await api(prometheus, "/api/v1/targets"))["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if all(health.get(job) == "up" for job in wanted) or loop.time() > deadline:
            break
        await asyncio.sleep(1)
    assert {job: health.get(job) for job in wanted} == dict.fromkeys(wanted, "up"), targets


async def test_the_shipped_alert_rules_are_loaded(prometheus: httpx.AsyncClient) -> None:
    shipped = yaml.safe_load(ALERTS.read_text())
    expected = {
        group["name"]: sorted(rule["alert"] for rule in group["rules"])
        for group in shipped["groups"]
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # a rule's health is "unknown" until its group's first evaluation (15 s)
        groups = (await api(prometheus, "/api/v1/rules"))["groups"]
        health = [rule["health"] for group in groups for rule in group["rules"]]
        if "unknown" not in health or loop.time() > deadline:
            break
        await asyncio.sleep(1)
    loaded = {group["name"]: sorted(rule["name"] for rule in group["rules"]) for group in groups}
    assert loaded == expected
    assert set(health) == {"ok"}, groups


async def test_a_gozon_series_is_queryable(prometheus: httpx.AsyncClient) -> None:
    response = await prometheus.get(
        "/api/v1/query", params={"query": 'up{job=~"gateway|orders-.*|payments-.*"}'}
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert sorted(r["metric"]["job"] for r in data["result"]) == sorted(p.name for p in PROCESSES)
