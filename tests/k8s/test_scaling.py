"""Autoscaling and disruption budgets for real (`make test-k8s`, issue 30).

The node runs metrics-server (k8s/node-cluster), so the chart's HorizontalPodAutoscalers get
the pods' CPU. On the release of tests/k8s/conftest.py, after tests/k8s/test_node.py:

- `helm upgrade --reuse-values` turns on both consumers' HPAs, asking for up to 6 replicas
  (the chart caps them at the topics' 3 partitions) with a low CPU target, and every process's
  PodDisruptionBudget (the orders relay's with `maxUnavailable: 0`);
- under a steady load each consumer scales out, never past 3 replicas (watched every second),
  each partition owned by exactly one of its pods (Kafka's view of the group); the orders keep
  completing and the invariants hold; after the load both scale back in to one replica (the
  node's downscale stabilization is 60 s);
- `kubectl drain --dry-run=server`: the API server accepts every pod's eviction but the
  relay's, which its budget refuses;
- then the HPAs and budgets are turned off again for the tests that follow.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest
from kubernetes import client

from scripts.kube_node import NODE_NAME
from tests.charts.support import chart_dir, tool
from tests.faults.load import SteadyLoad
from tests.k8s.conftest import RELEASE, Cluster
from tests.k8s.test_node import (
    CONSUMERS,
    GROUP_COMMAND,
    LOAD_RATE_PER_S,
    POOR,
    RICH,
    _exec,
    _fund,
    _gateway,
    _settled_and_checked,
    _until,
)

pytestmark = pytest.mark.timeout(2400)

PARTITIONS = 3
CPU_TARGET = 20  # % of the consumers' 50m request: busy under the load, idle without


def _helm_set(cluster: Cluster, *values: str) -> None:
    sets = [arg for v in values for arg in ("--set", v)]
    cluster.helm(
        "upgrade", RELEASE, str(chart_dir()), "--namespace", cluster.namespace,
        "--reuse-values", *sets, "--wait", "--timeout", "900s", timeout=960,
    )  # fmt: skip


def _autoscaling(enabled: bool) -> list[str]:
    values = []
    for name in CONSUMERS:
        values.append(f"processes.{name}.autoscaling.enabled={str(enabled).lower()}")
        if enabled:
            values += [
                f"processes.{name}.autoscaling.maxReplicas=6",
                f"processes.{name}.autoscaling.targetCPUUtilizationPercentage={CPU_TARGET}",
            ]
    return values


def _budgets(enabled: bool) -> list[str]:
    names = ("gateway", "orders-api", "orders-relay", *CONSUMERS, "payments-api", "payments-relay")
    values = [f"processes.{n}.pdb.enabled={str(enabled).lower()}" for n in names]
    return [*values, f"processes.orders-relay.pdb.maxUnavailable={0 if enabled else 1}"]


def _hpa(cluster: Cluster, name: str) -> Any:
    return client.AutoscalingV2Api(cluster.api).read_namespaced_horizontal_pod_autoscaler(
        f"{RELEASE}-{name}", cluster.namespace
    )


def _has_metrics(cluster: Cluster, name: str) -> bool:
    hpa = _hpa(cluster, name)
    metrics = hpa.status.current_metrics or []
    return any(m.resource and m.resource.current.average_utilization is not None for m in metrics)


def _partitions_owned_once(cluster: Cluster, group: str, topic: str, name: str) -> bool:
    """Every partition of `topic` has exactly one owner in the group, and every owner is a
    running pod of the consumer."""
    ips = {
        p.status.pod_ip
        for p in cluster.pods(f"app.kubernetes.io/component={name}")
        if p.metadata.deletion_timestamp is None
    }
    (broker,) = cluster.pods("app.kubernetes.io/name=kafka")
    out = _exec(
        cluster,
        broker.metadata.name,
        [
            "/opt/kafka/bin/java-main", GROUP_COMMAND,
            "--bootstrap-server", "localhost:9092", "--describe", "--group", group,
        ],
    )  # fmt: skip
    owners: dict[int, list[str]] = {}
    for line in str(out).splitlines():
        words = line.split()
        if len(words) >= 9 and words[0] == group and words[1] == topic and words[6] != "-":
            owners.setdefault(int(words[2]), []).append(words[7].lstrip("/"))
    return (
        sorted(owners) == list(range(PARTITIONS))
        and all(len(v) == 1 for v in owners.values())
        and {v[0] for v in owners.values()} <= ips
    )


async def test_consumers_autoscale_out_and_back_in(cluster: Cluster) -> None:
    _helm_set(cluster, *_autoscaling(True), *_budgets(True))
    try:
        for name in CONSUMERS:
            assert _hpa(cluster, name).spec.max_replicas == PARTITIONS, name
            await _until(lambda n=name: _has_metrics(cluster, n), 300, f"{name}'s CPU metric")
        gateway = _gateway(cluster)
        await _fund(gateway)
        most = dict.fromkeys(CONSUMERS, 0)

        def replicas(name: str) -> int:
            d: Any = cluster.apps.read_namespaced_deployment(f"{RELEASE}-{name}", cluster.namespace)
            seen = max(d.spec.replicas or 0, d.status.replicas or 0)
            most[name] = max(most[name], seen)
            return int(d.status.ready_replicas or 0)

        def scaled_out() -> bool:
            counts = [replicas(n) for n in CONSUMERS]  # both read: the most seen of each
            return all(c > 1 for c in counts)

        started = time.monotonic()
        async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
            await _until(scaled_out, 600, "both consumers scaled out under the load")
            out_after = time.monotonic() - started
            for name, (group, topic) in CONSUMERS.items():
                await _until(
                    lambda g=group, t=topic, n=name: _partitions_owned_once(cluster, g, t, n),
                    180,
                    f"group {group}: each partition of {topic} owned once",
                )
            placed = time.time()
            await _until(
                lambda: sum(r.status == 201 and r.sent_at > placed for r in load.log) >= 20,
                240,
                "20 orders with the consumers scaled out",
            )
        figures = await _settled_and_checked(cluster, load.log)
        stopped = time.monotonic()

        def scaled_in() -> bool:
            counts = [replicas(n) for n in CONSUMERS]
            desired = [_hpa(cluster, n).status.desired_replicas for n in CONSUMERS]
            return counts == [1, 1] and desired == [1, 1]

        await _until(
            scaled_in,
            900,
            "both consumers back to one replica after the load",
        )
        in_after = time.monotonic() - stopped
        assert all(n <= PARTITIONS for n in most.values()), most
        print(
            f"\nautoscaling: out after {out_after:.0f} s of load, back in {in_after:.0f} s "
            f"after it; most replicas {most}; {figures}"
        )
        _drain_respects_budgets(cluster)
    finally:
        _helm_set(cluster, *_autoscaling(False), *_budgets(False))


def _drain_respects_budgets(cluster: Cluster) -> None:
    done = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(cluster.node.kubeconfig), "drain", NODE_NAME,
         "--dry-run=server", "--ignore-daemonsets", "--delete-emptydir-data", "--force",
         "--timeout=60s"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    (relay,) = cluster.pods("app.kubernetes.io/component=orders-relay")
    assert done.returncode != 0, out
    assert "disruption budget" in out, out
    assert relay.metadata.name in out, out
    # every other pod's eviction accepted (a dry run deletes nothing, so kubectl then waits
    # for them until its timeout), only the relay's refused
    (gateway,) = cluster.pods("app.kubernetes.io/component=gateway")
    assert f"{gateway.metadata.name} (server dry run)" in out, out
    refused = set(re.findall(r'error when evicting pods/"([^"]+)"', out))
    assert refused == {relay.metadata.name}, refused
    accepted = set(re.findall(r"evicting pod \S+/(\S+) \(server dry run\)", out)) - refused
    node: Any = cluster.core.read_node(NODE_NAME)
    assert not node.spec.unschedulable, "a dry run cordoned the node"
    print(f"\ndrain --dry-run=server: {len(accepted)} evictions accepted, "
          f"{relay.metadata.name}'s refused by its budget")  # fmt: skip
