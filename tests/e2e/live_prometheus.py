"""A real Prometheus (Debian's, `devstack.prometheus_tool`) scraping the e2e platform.

It scrapes every process of the process table under its name as `job`, as compose and the
chart do, every second, and evaluates the shipped alert rules (charts/gozon/dashboards/
alerts.yaml, unchanged) every second: the rules' own `for` and windows are real time.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import port_for
import yaml

from devstack import http_status, prometheus_tool, wait_for
from gozon.processes import PROCESSES
from tests.e2e.conftest import Platform

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts" / "gozon" / "dashboards" / "alerts.yaml"


class LivePrometheus:
    def __init__(self, platform: Platform, folder: Path) -> None:
        self.folder = folder
        self.port = port_for.select_random()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        jobs = []
        for entry in PROCESSES:
            address = urllib.parse.urlsplit(platform.metrics_url(entry.name)).netloc
            jobs.append({"job_name": entry.name, "static_configs": [{"targets": [address]}]})
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": jobs,
        }
        self.config = folder / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")

    def start(self) -> LivePrometheus:
        """Starts it (again, on the same data: a restart keeps the series, as in production)."""
        log = (self.folder / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(prometheus_tool("prometheus")),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(
            lambda: http_status(f"{self.url}/-/ready") == 200, timeout=120, what="Prometheus ready"
        )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def api(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            response = await client.get(f"/api/v1/{path}", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = (await self.api("alerts"))["alerts"]
        return [alert for alert in alerts if alert["state"] == state]

    async def wait_scraped(self, samples: int = 5, within: float = 120) -> None:
        """Until every target is up and has been scraped `samples` times since it (re)started,
        and every rule group has been evaluated."""
        deadline = time.monotonic() + within
        wanted = {p.name for p in PROCESSES}
        while True:
            counts = {
                r["metric"]["job"]: float(r["value"][1])
                for r in await self.query(f"count_over_time(up[{samples * 2}s]) and up == 1")
            }
            groups = (await self.api("rules"))["groups"]
            evaluated = all(g["lastEvaluation"] > "2000" for g in groups)
            if evaluated and all(counts.get(job, 0) >= samples for job in wanted):
                return
            assert time.monotonic() < deadline, f"not scraped yet: {counts}"
            await asyncio.sleep(0.5)
