"""The chart on a real node (`make test-k8s`, docs/kubernetes.md "Verified on a real node").

In order, on one release: every Deployment Available with real containers and the migration
Jobs Complete; `helm test` (the spec's saga through the gateway's Service); the payments
consumer's pod deleted under load (replaced, and the invariant checker of the fault suite finds
every order final and nothing debited twice); both consumers scaled to three replicas (each
partition consumed by exactly one replica, and orders keep completing).
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.charts.support import tool
from tests.faults.invariants import ClientRecord, check, wait_until_settled
from tests.faults.load import SteadyLoad
from tests.k8s.conftest import DEPLOYMENTS, RELEASE, Cluster

# The first test also waits for the release's install (the session fixture), which takes
# minutes on a busy machine; each later test has its own waits with their own deadlines.
pytestmark = pytest.mark.timeout(1800)

RICH = tuple(f"k8s-rich-{n}" for n in range(10))
POOR = ("k8s-poor-0",)
LOAD_RATE_PER_S = 8.0  # the whole platform, Kafka and two databases share two cores
SETTLE_S = 240.0
# kafka-consumer-groups.sh's class (the broker image has its jars, not the script)
GROUP_COMMAND = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
# consumer -> (its Kafka group, the topic it consumes)
CONSUMERS = {
    "orders-consumer": ("orders", "payment.processed.event"),
    "payments-consumer": ("payments", "order.created.event"),
}


def _gateway(cluster: Cluster) -> str:
    return f"http://{cluster.service_ip(f'{RELEASE}-gateway')}:8080"


def _database_urls(cluster: Cluster) -> tuple[str, str]:
    """The processes' own database URLs, with each database's pod address for its name."""
    secret: Any = cluster.core.read_namespaced_secret(RELEASE, cluster.namespace)
    urls = []
    for service in ("orders", "payments"):
        url = base64.b64decode(secret.data[f"GOZON_{service.upper()}_DATABASE_URL"]).decode()
        host = f"{RELEASE}-{service}-db"
        urls.append(url.replace(f"@{host}:", f"@{cluster.pod_ip(f'{host}-0')}:"))
    return urls[0], urls[1]


async def _fund(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        for user, amount in [*((u, 1_000_000) for u in RICH), *((u, 20) for u in POOR)]:
            response = await http.post(
                f"/api/payments/deposit?amount={amount}",
                headers={"X-User-Id": user, "Idempotency-Key": f"fund-{user}-{time.time_ns()}"},
            )
            assert response.status_code == 200, response.text


async def _settled_and_checked(cluster: Cluster, log: list[ClientRecord]) -> dict[str, Any]:
    orders_url, payments_url = _database_urls(cluster)
    waited = await wait_until_settled(orders_url, payments_url, within=SETTLE_S)
    report = await check(orders_url, payments_url, log)
    assert not report.violations, "\n".join(report.violations)
    assert report.statuses.get(201, 0) > 0, report.statuses
    # what the clients were told besides 201, most frequent first (for the report)
    others = Counter(
        f"{r.status} {r.detail or r.outcome or ''}"[:120] for r in log if r.status != 201
    )
    return {
        "settled_s": round(waited, 1),
        "statuses": report.statuses,
        "other_answers": others.most_common(4),
    }


def test_every_deployment_available_with_real_containers(cluster: Cluster) -> None:
    for name in DEPLOYMENTS:
        assert cluster.deployment_available(name), name
        pods = cluster.pods(f"app.kubernetes.io/component={name.removeprefix(RELEASE + '-')}")
        assert pods, f"no pod of {name}"
        for pod in pods:
            statuses = pod.status.container_statuses or []
            assert statuses, pod.metadata.name
            assert all(s.ready and s.container_id for s in statuses), pod.metadata.name
            # a container of containerd's, on the real node (not a kwok fake)
            assert all(s.container_id.startswith("containerd://") for s in statuses)
            assert pod.spec.node_name == "gozon-node"
    jobs: Any = cluster.batch.list_namespaced_job(cluster.namespace).items
    migrations = [j for j in jobs if "migrate" in j.metadata.name]
    assert len(migrations) == 2, [j.metadata.name for j in jobs]
    for job in migrations:
        assert job.status.succeeded == 1, job.metadata.name


def test_helm_test_runs_the_saga(cluster: Cluster) -> None:
    done = cluster.helm(
        "test", RELEASE, "--namespace", cluster.namespace, "--logs", "--timeout", "600s",
        timeout=700,
    )  # fmt: skip
    assert "FINISHED" in done.stdout, done.stdout
    assert "3499.01" in done.stdout, done.stdout


def test_logs_and_exec_reach_the_node(cluster: Cluster) -> None:
    """The API server reaches the kubelet at the node's address: logs and exec work."""
    pod = cluster.pods("app.kubernetes.io/component=gateway")[0]
    text = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace)
    assert str(text).strip(), "the gateway's log is empty"
    out = _exec(
        cluster, pod.metadata.name, ["python3", "-c", "import socket; print(socket.gethostname())"]
    )
    assert pod.metadata.name in out


async def test_payments_consumer_pod_deleted_under_load(cluster: Cluster) -> None:
    gateway = _gateway(cluster)
    await _fund(gateway)
    selector = "app.kubernetes.io/component=payments-consumer"
    (victim,) = cluster.pods(selector)
    async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
        await _until(lambda: sum(r.status == 201 for r in load.log) >= 20, 180, "20 orders in")
        cluster.core.delete_namespaced_pod(victim.metadata.name, cluster.namespace)
        deleted_at = time.time()
        await _until(
            lambda: _replaced(cluster, selector, victim.metadata.name), 300, "a new consumer pod"
        )
        # orders sent after the replacement came up complete too
        replaced_at = time.time()
        await _until(
            lambda: sum(r.status == 201 and r.sent_at > replaced_at for r in load.log) >= 20,
            180,
            "20 orders after the replacement",
        )
    figures = await _settled_and_checked(cluster, load.log)
    print(f"\npod deleted at {deleted_at:.0f}: {figures}")


async def test_consumers_scaled_to_three(cluster: Cluster) -> None:
    gateway = _gateway(cluster)
    await _fund(gateway)
    for name in CONSUMERS:
        cluster.apps.patch_namespaced_deployment_scale(
            f"{RELEASE}-{name}", cluster.namespace, {"spec": {"replicas": 3}}
        )
    try:
        for name in CONSUMERS:
            await _until(
                lambda n=name: cluster.deployment_available(f"{RELEASE}-{n}", 3),
                300,
                f"{name} with 3 replicas Available",
            )
        for name, (group, topic) in CONSUMERS.items():
            ips = {p.status.pod_ip for p in cluster.pods(f"app.kubernetes.io/component={name}")}
            assert len(ips) == 3
            await _until(
                lambda g=group, t=topic, i=ips: _one_replica_per_partition(cluster, g, t, i),
                180,
                f"group {group}: one partition of {topic} per replica",
            )
        async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
            await _until(lambda: sum(r.status == 201 for r in load.log) >= 40, 240, "40 orders in")
        figures = await _settled_and_checked(cluster, load.log)
        print(f"\nthree replicas of each consumer: {figures}")
    finally:
        for name in CONSUMERS:
            cluster.apps.patch_namespaced_deployment_scale(
                f"{RELEASE}-{name}", cluster.namespace, {"spec": {"replicas": 1}}
            )


# ------------------------------------------------------------------------------ helpers


async def _until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(1)


def _exec(cluster: Cluster, pod: str, command: list[str]) -> str:
    """`kubectl exec`: through the API server and the kubelet; what the command printed.

    (kubectl rather than the client's websocket stream, which leaves its socket open.)"""
    done = subprocess.run(
        [
            tool("kubectl"), "--kubeconfig", str(cluster.node.kubeconfig),
            "--namespace", cluster.namespace, "exec", pod, "--", *command,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"kubectl exec {pod} -- {command}: {done.stderr}"
    return done.stdout


def _replaced(cluster: Cluster, selector: str, old: str) -> bool:
    """A pod other than `old` is ready and the Deployment is Available again."""
    for pod in cluster.pods(selector):
        statuses = pod.status.container_statuses or []
        if (
            pod.metadata.name != old
            and pod.metadata.deletion_timestamp is None
            and statuses
            and all(s.ready for s in statuses)
        ):
            return cluster.deployment_available(f"{RELEASE}-payments-consumer")
    return False


def _one_replica_per_partition(cluster: Cluster, group: str, topic: str, ips: set[str]) -> bool:
    """Kafka's own view of the group (kafka-consumer-groups --describe, run in the broker's
    pod through exec): every partition of `topic` has exactly one owner, and the owners are the
    three replicas, one partition each."""
    (broker,) = cluster.pods("app.kubernetes.io/name=kafka")
    out = _exec(
        cluster,
        broker.metadata.name,
        [
            "/opt/kafka/bin/java-main", GROUP_COMMAND,
            "--bootstrap-server", "localhost:9092", "--describe", "--group", group,
        ],
    )  # fmt: skip
    owners: dict[int, list[tuple[str, str]]] = {}
    for line in str(out).splitlines():
        words = line.split()
        if len(words) >= 9 and words[0] == group and words[1] == topic:
            consumer, host = words[6], words[7].lstrip("/")
            if consumer != "-":
                owners.setdefault(int(words[2]), []).append((consumer, host))
    if sorted(owners) != [0, 1, 2] or any(len(v) != 1 for v in owners.values()):
        return False
    consumers = {v[0][0] for v in owners.values()}
    hosts = {v[0][1] for v in owners.values()}
    return len(consumers) == 3 and hosts == ips
