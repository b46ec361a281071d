"""Upgrade, rollback, upgrade under load on the node (`make test-k8s`, issue 30).

On the release of tests/k8s/conftest.py (revision 1, today's image), last of the node's tests:

1. `helm upgrade` to the next release's image (tests/k8s/next_image.py: docker/Dockerfile with
   one more, expand-only migration, 9001, per service): its migration Jobs move both databases
   to 9001;
2. `helm rollback` to revision 1: today's image on the newer schema (the schema gate and
   `migrate` accept a descendant of their head, docs/adr/0101-expand-contract-migrations.md);
   its migration Jobs exit 0 and leave the schema at 9001;
3. `helm upgrade` to the next image again.

Each step runs under a steady load through the gateway's Service, with `--wait`; after each,
every Deployment is Available on the step's image, `helm test` passes (the saga), and under
the load: no 500, every other 5xx one the failure contract allows (docs/reliability.md: 503
"not processed", 502/504 "outcome unknown"), no request refused for lack of endpoints (no
connection to the gateway; no gateway 503 "unavailable", which is a refused connection to an
API), the invariants hold and `gozon reconcile` exits 0. The figures are printed per step.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.charts.support import chart_dir
from tests.faults.invariants import ClientRecord
from tests.faults.load import SteadyLoad
from tests.k8s.conftest import DEPLOYMENTS, IMAGE, INSTALL_TIMEOUT_S, RELEASE, Cluster
from tests.k8s.next_image import next_image
from tests.k8s.test_node import (
    LOAD_RATE_PER_S,
    POOR,
    RICH,
    _database_urls,
    _fund,
    _gateway,
    _settled_and_checked,
    _until,
)
from tests.k8s.test_storage import kubectl, reconcile_exit
from tests.next_release import NEXT_REVISION

pytestmark = pytest.mark.timeout(3600)


async def _schema(cluster: Cluster) -> dict[str, str]:
    """Each database's Alembic revision."""
    out = {}
    for service, url in zip(("orders", "payments"), _database_urls(cluster), strict=True):
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            out[service] = str(await conn.fetchval("SELECT version_num FROM alembic_version"))
        finally:
            await conn.close()
    return out


def _on_image(cluster: Cluster, image: str) -> bool:
    """Every Deployment Available, all its pods (and only those) on `image`."""
    for name in DEPLOYMENTS:
        d: Any = cluster.apps.read_namespaced_deployment(name, cluster.namespace)
        if d.spec.template.spec.containers[0].image != image:
            return False
        if not cluster.deployment_available(name):
            return False
        pods = cluster.pods(f"app.kubernetes.io/component={name.removeprefix(RELEASE + '-')}")
        if any(p.spec.containers[0].image != image for p in pods):
            return False
    return True


def _figures(log: list[ClientRecord]) -> dict[str, Any]:
    statuses = Counter(r.status for r in log)
    return {
        "requests": len(log),
        "201": statuses.get(201, 0),
        "503": statuses.get(503, 0),
        "502/504": statuses.get(502, 0) + statuses.get(504, 0),
        "no answer": statuses.get(0, 0),
        "500": statuses.get(500, 0),
    }


async def _step(
    cluster: Cluster, what: str, action: Callable[[], Any], image: str
) -> dict[str, Any]:
    gateway = _gateway(cluster)
    await _fund(gateway)
    started = time.monotonic()
    async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
        await _until(lambda: sum(r.status == 201 for r in load.log) >= 10, 180, "10 orders in")
        began = time.monotonic()
        await asyncio.to_thread(action)
        took = time.monotonic() - began
        await _until(lambda: _on_image(cluster, image), 600, f"{what}: every Deployment on {image}")
        done_at = time.time()
        await _until(
            lambda: sum(r.status == 201 and r.sent_at > done_at for r in load.log) >= 10,
            240,
            f"{what}: 10 orders after it",
        )
    log = list(load.log)
    figures = {"step": what, "helm_s": round(took, 1), **_figures(log)}
    figures.update(await _settled_and_checked(cluster, log))
    figures["load_s"] = round(time.monotonic() - started, 1)
    print(f"\n{what}: {figures}")
    # the failure contract: no 500; a 503 says "not processed", 502/504 "unknown" (checked by
    # _settled_and_checked); nothing refused for lack of endpoints
    assert figures["500"] == 0, figures
    wrong = [r for r in log if r.status == 503 and r.outcome != "not_processed"]
    assert not wrong, wrong[:3]
    refused = [r for r in log if r.status == 0 and r.outcome == "not_sent"]
    assert not refused, f"{len(refused)} requests found no gateway endpoint: {refused[:3]}"
    # the gateway's own 503 for an upstream it could not connect to ("The orders service is
    # unavailable"), not an API's 503 "The database is unavailable or too slow", which the
    # contract allows
    unavailable = [
        r for r in log if r.status == 503 and "service is unavailable" in (r.detail or "")
    ]
    assert not unavailable, f"{len(unavailable)} found no API endpoint: {unavailable[:3]}"
    other_5xx = [r for r in log if r.status >= 500 and r.status not in (502, 503, 504)]
    assert not other_5xx, other_5xx[:3]
    code, out = reconcile_exit(cluster)
    assert code == 0, out
    done = cluster.helm(
        "test", RELEASE, "--namespace", cluster.namespace, "--logs", "--timeout", "600s",
        timeout=700,
    )  # fmt: skip
    assert "FINISHED" in done.stdout, done.stdout
    return figures


def _migration_jobs(cluster: Cluster) -> dict[str, Any]:
    jobs: Any = cluster.batch.list_namespaced_job(cluster.namespace).items
    return {j.metadata.name: j for j in jobs if "-migrate-" in j.metadata.name}


def _jobs_done_on(cluster: Cluster, image: str) -> bool:
    jobs = [
        j for j in _migration_jobs(cluster).values()
        if j.spec.template.spec.containers[0].image == image
    ]  # fmt: skip
    return len(jobs) == 2 and all((j.status.succeeded or 0) == 1 for j in jobs)


async def test_upgrade_rollback_upgrade_under_load(cluster: Cluster) -> None:
    nxt = await asyncio.to_thread(next_image, cluster.node, IMAGE)
    tag = nxt.rpartition(":")[2]
    base_schema = await _schema(cluster)
    assert NEXT_REVISION not in base_schema.values(), base_schema
    wait = ("--wait", "--timeout", f"{INSTALL_TIMEOUT_S}s")

    def upgrade() -> None:
        cluster.helm(
            "upgrade", RELEASE, str(chart_dir()), "--namespace", cluster.namespace,
            "--reuse-values", "--set", f"image.tag={tag}", *wait, timeout=INSTALL_TIMEOUT_S + 60,
        )  # fmt: skip

    def rollback() -> None:
        cluster.helm(
            "rollback", RELEASE, "1", "--namespace", cluster.namespace, *wait,
            timeout=INSTALL_TIMEOUT_S + 60,
        )  # fmt: skip

    steps = []
    steps.append(await _step(cluster, "upgrade to the next image", upgrade, nxt))
    await _until(lambda: _jobs_done_on(cluster, nxt), 300, "the next image's migration Jobs")
    assert await _schema(cluster) == {"orders": NEXT_REVISION, "payments": NEXT_REVISION}

    steps.append(await _step(cluster, "rollback to revision 1", rollback, IMAGE))
    await _until(lambda: _jobs_done_on(cluster, IMAGE), 300, "revision 1's migration Jobs again")
    # today's migrate left the newer schema alone and said so
    for name, job in _migration_jobs(cluster).items():
        if job.spec.template.spec.containers[0].image == IMAGE:
            log = kubectl(cluster, "logs", f"job/{name}", "--all-containers")
            assert NEXT_REVISION in log, log
    assert await _schema(cluster) == {"orders": NEXT_REVISION, "payments": NEXT_REVISION}

    steps.append(await _step(cluster, "upgrade to the next image again", upgrade, nxt))
    history = cluster.helm("history", RELEASE, "-n", cluster.namespace, "-o", "json").stdout
    assert '"revision":4' in history.replace(" ", ""), history
    print("\nrollouts under load:")
    for s in steps:
        print(f"  {s}")
