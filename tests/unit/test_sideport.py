"""The workers' side port (gozon.core.sideport): a real aiohttp server on a loopback port."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import Gauge

from gozon.core import sideport
from gozon.core.health import Readiness
from gozon.core.sideport import side_port

REFRESHED = Gauge("gozon_test_sideport_refreshed", "Set by the test's scrape hook.")


async def test_a_hook_that_never_finishes_does_not_hold_up_the_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hook stuck on a stalled database: /metrics still answers, with every other metric and
    the gauges the hooks refreshed before."""
    monkeypatch.setattr(sideport, "SCRAPE_HOOK_TIMEOUT_S", 0.2)
    stuck = asyncio.Event()

    async def refresh() -> None:
        REFRESHED.set(7)

    async def stalled() -> None:
        stuck.set()
        await asyncio.Event().wait()  # never set: the database does not answer

    async with side_port("127.0.0.1", 0, Readiness(), [refresh, stalled]) as port:
        # Far above the hook's bound; without the bound the answer never comes.
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            body = await response.text()
    assert stuck.is_set()
    assert response.status == 200
    assert "gozon_test_sideport_refreshed 7.0" in body
