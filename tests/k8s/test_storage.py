"""The bundled databases on real volumes, and a backup restored (`make test-k8s`).

The node's default StorageClass (`local-path`: rancher's local-path-provisioner, run by
k8s/node-cluster) gives each database a hostPath volume on the node. On the release of
tests/k8s/conftest.py, after tests/k8s/test_node.py:

- each database's data is on a bound claim of that class, in a folder the provisioner made;
- the orders database's pod deleted under load: the StatefulSet brings it back on the same
  volume, every order it had is still there, the invariants hold and `gozon reconcile` exits 0;
- orders written; the backups turned on (`helm upgrade --reuse-values --set
  backup.enabled=true`) and the CronJob run by hand (`kubectl create job --from=cronjob/…`);
  the orders database's volume destroyed; the restore runbook of docs/operations.md
  ("Restoring from a backup"), steps 1-6, with its own kubectl commands; `gozon reconcile`
  exits 0 and every order acknowledged before the backup is there, final.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from scripts.kube_node import STORAGE_CLASS
from tests.charts.support import chart_dir, tool
from tests.faults.invariants import check, wait_until_settled
from tests.faults.load import SteadyLoad
from tests.k8s.conftest import DEPLOYMENTS, IMAGE, POSTGRES_IMAGE, RELEASE, Cluster
from tests.k8s.test_node import (
    LOAD_RATE_PER_S,
    POOR,
    RICH,
    SETTLE_S,
    _database_urls,
    _fund,
    _gateway,
    _settled_and_checked,
    _until,
)

pytestmark = pytest.mark.timeout(1800)

DATABASES = {"orders": "order_db", "payments": "account_db"}
# the backup pods' labels: the databases' NetworkPolicies admit them
BACKUP_LABELS = (
    f"app.kubernetes.io/name=gozon,app.kubernetes.io/instance={RELEASE},"
    "app.kubernetes.io/component=backup"
)


def kubectl(cluster: Cluster, *args: str, timeout: float = 600, check: bool = True) -> str:
    """kubectl in the release's namespace; what it printed (its error fails the test)."""
    done = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(cluster.node.kubeconfig), "-n", cluster.namespace,
         *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout + done.stderr


def reconcile_exit(cluster: Cluster) -> tuple[int, str]:
    """`gozon reconcile` as docs/operations.md runs it in Kubernetes: a pod of the release's
    image with the release's Secret (both databases' URLs) and the backup pods' labels (which
    the databases' NetworkPolicies admit); its exit code and what it printed."""
    d: Any = cluster.apps.read_namespaced_deployment(
        f"{RELEASE}-orders-consumer", cluster.namespace
    )
    image = d.spec.template.spec.containers[0].image
    name = f"gozon-reconcile-{int(time.time())}"
    overrides = {
        "spec": {
            # the Services' link variables (GOZON_ORDERS_API_PORT=tcp://…) would be read as
            # the gozon settings of the same names: off, as in the chart's pods
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": name,
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", 'gozon reconcile --stuck-after 120; echo "exit $?"'],
                    "envFrom": [{"secretRef": {"name": RELEASE}}],
                }
            ],
        }
    }
    out = kubectl(
        cluster, "run", name, "--rm", "-i", "--restart=Never", f"--image={image}",
        f"--labels={BACKUP_LABELS}", f"--overrides={json.dumps(overrides)}",
        "--pod-running-timeout=5m", check=False,
    )  # fmt: skip
    codes = re.findall(r"^exit (\d+)$", out, re.M)
    return (int(codes[-1]) if codes else -1), out


async def _orders(cluster: Cluster) -> dict[str, str]:
    """order_db's orders: id -> status."""
    orders_url, _ = _database_urls(cluster)
    conn = await asyncpg.connect(orders_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch("SELECT id::text AS id, status FROM orders")
    finally:
        await conn.close()
    return {r["id"]: r["status"] for r in rows}


def _claim(cluster: Cluster, service: str) -> Any:
    return cluster.core.read_namespaced_persistent_volume_claim(
        f"data-{RELEASE}-{service}-db-0", cluster.namespace
    )


def _db_ready(cluster: Cluster, service: str, old_uid: str | None) -> bool:
    pods = cluster.pods(f"app.kubernetes.io/component={service}-db")
    return any(
        p.metadata.uid != old_uid
        and p.metadata.deletion_timestamp is None
        and p.status.container_statuses
        and all(s.ready for s in p.status.container_statuses)
        for p in pods
    )


def test_databases_on_provisioned_volumes(cluster: Cluster) -> None:
    for service in DATABASES:
        claim = _claim(cluster, service)
        assert claim.status.phase == "Bound", claim.status
        assert claim.spec.storage_class_name == STORAGE_CLASS
        pv: Any = cluster.core.read_persistent_volume(claim.spec.volume_name)
        path = Path(pv.spec.host_path.path)
        # the provisioner's folder on this machine, holding the database's files
        assert path.is_relative_to(cluster.node.volumes), path
        assert (path / "pgdata" / "PG_VERSION").is_file(), sorted(path.iterdir())
        pod: Any = cluster.core.read_namespaced_pod(f"{RELEASE}-{service}-db-0", cluster.namespace)
        (data,) = [v for v in pod.spec.volumes if v.name == "data"]
        assert data.persistent_volume_claim.claim_name == claim.metadata.name


async def test_orders_database_pod_deleted_under_load(cluster: Cluster) -> None:
    gateway = _gateway(cluster)
    await _fund(gateway)
    volume = _claim(cluster, "orders").spec.volume_name
    (victim,) = cluster.pods("app.kubernetes.io/component=orders-db")
    async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
        await _until(lambda: sum(r.status == 201 for r in load.log) >= 20, 180, "20 orders in")
        before = await _orders(cluster)
        cluster.core.delete_namespaced_pod(victim.metadata.name, cluster.namespace)
        await _until(
            lambda: _db_ready(cluster, "orders", victim.metadata.uid), 300, "orders-db back"
        )
        back_at = time.time()
        await _until(
            lambda: sum(r.status == 201 and r.sent_at > back_at for r in load.log) >= 20,
            240,
            "20 orders after the database came back",
        )
    assert _claim(cluster, "orders").spec.volume_name == volume, "not the same volume"
    figures = await _settled_and_checked(cluster, load.log)
    after = await _orders(cluster)
    lost = sorted(set(before) - set(after))
    assert not lost, f"{len(lost)} orders gone after the restart: {lost[:5]}"
    for name in DEPLOYMENTS:
        await _until(lambda n=name: cluster.deployment_available(n), 300, f"{name} Available")
    code, out = reconcile_exit(cluster)
    assert code == 0, out
    print(f"\norders-db deleted under load ({len(before)} orders before): {figures}")


async def test_backup_then_volume_destroyed_and_restored(cluster: Cluster) -> None:
    """docs/operations.md, "Backups" and "Restoring from a backup", on the node."""
    gateway = _gateway(cluster)
    await _fund(gateway)
    async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
        await _until(lambda: sum(r.status == 201 for r in load.log) >= 30, 240, "30 orders in")
    await _settled_and_checked(cluster, load.log)
    acknowledged = {r.order_id for r in load.log if r.status == 201 and r.order_id}
    started = time.time()

    # the backups turned on (docs/operations.md, "Backups"), the CronJob run now
    cluster.helm(
        "upgrade", RELEASE, str(chart_dir()), "--namespace", cluster.namespace,
        "--reuse-values", "--set", "backup.enabled=true", timeout=600,
    )  # fmt: skip
    job = f"{RELEASE}-backup-now"
    kubectl(cluster, "create", "job", f"--from=cronjob/{RELEASE}-backup", job)
    kubectl(cluster, "wait", f"job/{job}", "--for=condition=Complete", "--timeout=600s")
    logs = kubectl(cluster, "logs", f"job/{job}", "--all-containers")
    dumps = dict(re.findall(r"backup: (\w+) -> /backups/\w+/(\S+)\.dump", logs))
    assert set(dumps) == set(DATABASES.values()), logs

    # 1. stop everything that writes, remembering the replica counts; pause the backups
    selector = f"app.kubernetes.io/instance={RELEASE}"
    replicas = kubectl(
        cluster, "get", "deploy", "-l", selector, "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.spec.replicas}{\"\\n\"}{end}",
    )  # fmt: skip
    kubectl(cluster, "scale", "deploy", "-l", selector, "--replicas=0")
    kubectl(cluster, "patch", "cronjob", f"{RELEASE}-backup", "-p", '{"spec":{"suspend":true}}')
    try:
        for name in DEPLOYMENTS:
            await _until(lambda n=name: not cluster.pods(_component(n)), 300, f"{name} stopped")

        # 2. the orders database's volume destroyed: a new, empty one
        old = _claim(cluster, "orders")
        old_pv: Any = cluster.core.read_persistent_volume(old.spec.volume_name)
        old_path = Path(old_pv.spec.host_path.path)
        (db_pod,) = cluster.pods("app.kubernetes.io/component=orders-db")
        kubectl(cluster, "delete", "pvc", f"data-{RELEASE}-orders-db-0", "--wait=false")
        kubectl(cluster, "delete", "pod", f"{RELEASE}-orders-db-0")
        kubectl(cluster, "rollout", "status", f"statefulset/{RELEASE}-orders-db", "--timeout=600s")
        await _until(
            lambda: _db_ready(cluster, "orders", db_pod.metadata.uid), 300, "new orders-db"
        )
        await _until(
            lambda: not old_path.exists(), 300, f"the old volume's folder {old_path} removed"
        )
        assert _claim(cluster, "orders").spec.volume_name != old.spec.volume_name
        assert not await _orders_table_exists(cluster), "the new orders database is not empty"

        # 3. a restore pod with the backup volume and the chart's scripts, the backup pods' labels
        labels = BACKUP_LABELS
        overrides = {
            "spec": {
                "securityContext": {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
                "containers": [
                    {
                        "name": "gozon-restore",
                        "image": POSTGRES_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "infinity"],
                        "volumeMounts": [
                            {"name": "backups", "mountPath": "/backups"},
                            {"name": "scripts", "mountPath": "/scripts"},
                        ],
                    }
                ],
                "volumes": [
                    {
                        "name": "backups",
                        "persistentVolumeClaim": {"claimName": f"{RELEASE}-backups"},
                    },
                    {"name": "scripts", "configMap": {"name": f"{RELEASE}-scripts"}},
                ],
            }
        }
        kubectl(
            cluster, "run", "gozon-restore", "--restart=Never", f"--image={POSTGRES_IMAGE}",
            f"--labels={labels}", f"--overrides={json.dumps(overrides)}",
        )  # fmt: skip
        kubectl(cluster, "wait", "pod/gozon-restore", "--for=condition=Ready", "--timeout=300s")
        listing = kubectl(cluster, "exec", "gozon-restore", "--", "ls", "/backups/account_db",
                          "/backups/order_db")  # fmt: skip
        assert all(dump in listing for dump in dumps.values()), listing

        # 4. account_db, then order_db, from the same run
        for service, database in (("payments", "account_db"), ("orders", "order_db")):
            secret: Any = cluster.core.read_namespaced_secret(
                f"{RELEASE}-{service}-db", cluster.namespace
            )
            password = base64.b64decode(secret.data["password"]).decode()
            restore = (
                "exec", "gozon-restore", "--", "env", f"PGHOST={RELEASE}-{service}-db",
                "PGUSER=gozon", f"PGDATABASE={database}", f"PGPASSWORD={password}",
                "sh", "/scripts/restore.sh", f"/backups/{database}/{dumps[database]}.dump",
            )  # fmt: skip
            # the database's name may still lead to the replaced pod's address for a while (its
            # DNS record's TTL is 30 s): a restore that could not connect changed nothing, and is
            # run again, as the runbook says
            deadline = time.monotonic() + 180
            while f"-> {database}" not in (out := kubectl(cluster, *restore, check=False)):
                assert time.monotonic() < deadline, out
                assert "connection to server" in out, out
                await asyncio.sleep(5)
        kubectl(cluster, "delete", "pod", "gozon-restore")

        # 5. schemas to the image's head; every event sent since before the dump back in the outbox
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started - 3600))
        command = (
            f"gozon orders migrate && gozon payments migrate && "
            f"gozon orders outbox replay-sent --since {since} && "
            f"gozon payments outbox replay-sent --since {since}"
        )
        replay = {
            "spec": {
                # the Services' link variables (GOZON_ORDERS_API_PORT=tcp://…) would be read as
                # the gozon settings of the same names: off, as in the chart's pods
                "enableServiceLinks": False,
                "containers": [
                    {
                        "name": "gozon-replay",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", command],
                        "envFrom": [{"secretRef": {"name": RELEASE}}],
                    }
                ],
            }
        }
        out = kubectl(
            cluster, "run", "gozon-replay", "--rm", "-i", "--restart=Never", f"--image={IMAGE}",
            f"--labels={labels}", f"--overrides={json.dumps(replay)}", "--pod-running-timeout=5m",
        )  # fmt: skip
        assert "requeued" in out, out

    finally:
        # 6. the platform started again, the backups resumed, the books checked once settled
        for line in replicas.split():
            name, n = line.split("=")
            kubectl(cluster, "scale", "deploy", name, f"--replicas={n}")
        kubectl(
            cluster, "patch", "cronjob", f"{RELEASE}-backup", "-p", '{"spec":{"suspend":false}}'
        )
    for name in DEPLOYMENTS:
        await _until(lambda n=name: cluster.deployment_available(n), 600, f"{name} Available")
    orders_url, payments_url = _database_urls(cluster)
    settled_s = await wait_until_settled(orders_url, payments_url, within=SETTLE_S)
    report = await check(orders_url, payments_url, [])
    assert not report.violations, "\n".join(report.violations)
    code, out = reconcile_exit(cluster)
    assert code == 0, out
    orders = await _orders(cluster)
    missing = sorted(acknowledged - set(orders))
    assert not missing, f"{len(missing)} acknowledged orders lost: {missing[:5]}"
    unfinished = [i for i in acknowledged if orders[i] not in ("FINISHED", "CANCELLED")]
    assert not unfinished, unfinished[:5]
    print(
        f"\nrestored from {dumps}: {len(acknowledged)} acknowledged orders present, "
        f"settled in {settled_s:.0f} s; {report.summary()}"
    )


def _component(deployment: str) -> str:
    return f"app.kubernetes.io/component={deployment.removeprefix(RELEASE + '-')}"


async def _orders_table_exists(cluster: Cluster) -> bool:
    orders_url, _ = _database_urls(cluster)
    conn = await asyncpg.connect(orders_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return bool(await conn.fetchval("SELECT to_regclass('public.orders') IS NOT NULL"))
    finally:
        await conn.close()
