"""The chart's NetworkPolicies, enforced on the node (`make test-k8s`, issue 30).

The node runs kube-router's firewall (scripts/kube_node.py): iptables and ipset rules per pod,
so a policy here is a policy in force, and the other node tests (the saga, the load, the
consumers scaled and autoscaled, the database restored) all run with the policies on.

What is shown, each target at its pod's (or Service's) address, by a TCP connection:
- from the node, every target answers: whatever a pod is refused below, it is the policy's
  doing, not a port nobody listens on;
- from a pod in another namespace, and from a pod in the release's namespace without the
  platform's labels: the gateway's port answers; the orders and payments APIs, both
  databases, Kafka and every side port (the gateway's /metrics, the workers') do not;
- a relay reaches its own database and not the other service's.

Kafka is the test's own broker (tests/k8s/conftest.py), not the chart's: its NetworkPolicy,
which admits the release's pods only, is the test's, as a real broker's would be its operator's
(Strimzi writes one per listener).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.charts.support import tool
from tests.k8s.conftest import IMAGE, RELEASE, Cluster, wait_for

pytestmark = pytest.mark.timeout(900)

OPEN = "open"
CONNECT_TIMEOUT_S = 3.0

# Runs in a pod (the gozon image's Python): a JSON list of targets and the connect timeout
# in, their states out.
PROBE = """
import json, socket, sys
out = {}
for name, host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=float(sys.argv[2])).close()
        out[name] = "open"
    except ConnectionRefusedError:
        out[name] = "refused"
    except TimeoutError:
        out[name] = "timed out"
    except OSError as exc:
        out[name] = f"unreachable ({exc.strerror or exc})"
print(json.dumps(out))
"""


def _kubectl(
    cluster: Cluster, *args: str, stdin: str | None = None, timeout: float = 300, check: bool = True
) -> str:
    done = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(cluster.node.kubeconfig), *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def _probe_from(cluster: Cluster, namespace: str, pod: str, targets: list[tuple[str, str, int]],
                container: str | None = None) -> dict[str, str]:  # fmt: skip
    """Each target's state as seen from inside `pod`."""
    where = ["-c", container] if container else []
    out = _kubectl(
        cluster, "-n", namespace, "exec", pod, *where, "--", "python3", "-c", PROBE,
        json.dumps(targets), str(CONNECT_TIMEOUT_S),
    )  # fmt: skip
    states: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    return states


def _probe_from_node(targets: list[tuple[str, str, int]]) -> dict[str, str]:
    states = {}
    for name, host, port in targets:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            states[name] = OPEN
        except OSError as exc:
            states[name] = repr(exc)
    return states


def _one_pod(cluster: Cluster, component: str) -> Any:
    return _one_ready(cluster, f"app.kubernetes.io/component={component}", component)


def _one_ready(cluster: Cluster, selector: str, what: str) -> Any:
    """A ready pod matching `selector`, not being deleted."""
    pods = [
        p
        for p in cluster.pods(selector)
        if p.status.phase == "Running" and p.metadata.deletion_timestamp is None and _ready(p)
    ]
    assert pods, f"no ready pod of {what}"
    return pods[0]


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())


def _targets(cluster: Cluster) -> tuple[tuple[str, str, int], list[tuple[str, str, int]]]:
    """The gateway's port, and everything that must stay closed to strangers."""
    svc = cluster.service_ip
    gateway = ("gateway", svc(f"{RELEASE}-gateway"), 8080)
    ip = {c: _one_pod(cluster, c).status.pod_ip for c in (
        "gateway", "orders-relay", "orders-consumer", "payments-relay", "payments-consumer",
    )}  # fmt: skip
    kafka = str(
        _one_ready(cluster, "app.kubernetes.io/name=kafka", "the Kafka broker").status.pod_ip
    )
    closed = [
        ("orders API (Service)", svc(f"{RELEASE}-orders-api"), 8081),
        ("payments API (Service)", svc(f"{RELEASE}-payments-api"), 8082),
        ("orders DB", cluster.pod_ip(f"{RELEASE}-orders-db-0"), 5432),
        ("payments DB", cluster.pod_ip(f"{RELEASE}-payments-db-0"), 5432),
        ("Kafka", kafka, 9092),
        ("gateway side port", ip["gateway"], 9105),
        ("orders relay side port", ip["orders-relay"], 9101),
        ("orders consumer side port", ip["orders-consumer"], 9102),
        ("payments relay side port", ip["payments-relay"], 9103),
        ("payments consumer side port", ip["payments-consumer"], 9104),
    ]
    return gateway, closed


def _stranger(name: str, namespace: str) -> dict[str, Any]:
    """A pod of the release's image, without the platform's labels, that only waits: the
    probes are exec'd into it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "stranger"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "probe",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", "import time; time.sleep(3600)"],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def strangers(cluster: Cluster) -> Iterator[list[tuple[str, str]]]:
    """(namespace, pod): one in a namespace of its own, one unlabelled in the release's."""
    other = f"{cluster.namespace}-other"
    pods = [(other, "stranger"), (cluster.namespace, "stranger")]
    _kubectl(cluster, "create", "namespace", other)
    try:
        for ns, name in pods:
            _kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(_stranger(name, ns)))
        for ns, name in pods:
            _kubectl(cluster, "-n", ns, "wait", "--for=condition=Ready", f"pod/{name}",
                     "--timeout=300s", timeout=330)  # fmt: skip
        yield pods
    finally:
        _kubectl(cluster, "-n", cluster.namespace, "delete", "pod", "stranger", "--wait=false",
                 "--ignore-not-found", check=False)  # fmt: skip
        _kubectl(cluster, "delete", "namespace", other, "--wait=false", check=False)


def test_strangers_reach_the_gateway_and_nothing_else(
    cluster: Cluster, strangers: list[tuple[str, str]]
) -> None:
    gateway, closed = _answering_from_node(cluster)
    for namespace, pod in strangers:
        states = _as_enforced(cluster, namespace, pod, gateway, closed)
        where = f"pod {pod} in {namespace}"
        assert states[gateway[0]] == OPEN, (where, states)
        for name, _, _ in closed:
            assert states[name] in ("refused", "timed out"), (where, name, states[name])


def _answering_from_node(
    cluster: Cluster,
) -> tuple[tuple[str, str, int], list[tuple[str, str, int]]]:
    """The targets, once every one answers from the node: whatever a pod is refused later is
    the policy's doing, not a port nobody listens on. Just after the install a worker may
    still be restarting (it started before the broker was ready), so this waits for every
    process to be ready and listening, re-reading the pods' addresses, up to two minutes."""
    targets: list[tuple[str, str, int]] = []
    states: dict[str, str] = {}

    def every_target_answers() -> bool:
        try:
            gateway, closed = _targets(cluster)
        except AssertionError as exc:  # a process without a ready pod yet
            states.clear()
            states["pods"] = str(exc)
            return False
        targets[:] = [gateway, *closed]
        states.clear()
        states.update(_probe_from_node(targets))
        return all(state == OPEN for state in states.values())

    with contextlib.suppress(AssertionError):
        wait_for(every_target_answers, within=120, what="every target answering", every=3)
    silent = {name: state for name, state in states.items() if state != OPEN}
    assert not silent, f"not answering from the node: {silent}"
    return targets[0], targets[1:]


def _as_enforced(
    cluster: Cluster,
    namespace: str,
    pod: str,
    gateway: tuple[str, str, int],
    closed: list[tuple[str, str, int]],
) -> dict[str, str]:
    """The states seen from `pod`, once they are what the policies say or after a minute
    (kube-router applies a new pod's rules within a sync, not at once)."""
    states: dict[str, str] = {}

    def settled() -> bool:
        states.update(_probe_from(cluster, namespace, pod, [gateway, *closed]))
        return states[gateway[0]] == OPEN and all(states[n] != OPEN for n, _, _ in closed)

    started = time.monotonic()
    # past the minute, the caller's assertions say which target is wrong
    with contextlib.suppress(AssertionError):
        wait_for(settled, within=60, what=f"pod {pod} in {namespace}", every=3)
    print(f"\nfrom pod {pod} in {namespace} ({time.monotonic() - started:.0f} s): {states}")
    return states


def test_a_relay_reaches_its_own_database_only(cluster: Cluster) -> None:
    dbs = {
        s: (f"{s} DB", cluster.pod_ip(f"{RELEASE}-{s}-db-0"), 5432) for s in ("orders", "payments")
    }
    for own, other in (("orders", "payments"), ("payments", "orders")):
        relay = _one_pod(cluster, f"{own}-relay")
        states = _probe_from(
            cluster, cluster.namespace, relay.metadata.name, [dbs[own], dbs[other]],
            container=f"{own}-relay",
        )  # fmt: skip
        print(f"\nfrom the {own} relay: {states}")
        assert states[dbs[own][0]] == OPEN, states
        assert states[dbs[other][0]] in ("refused", "timed out"), states


def test_a_service_without_endpoints_refuses_at_once(
    cluster: Cluster, strangers: list[tuple[str, str]]
) -> None:
    """A connection to a Service address kube-proxy does not translate (no endpoint) fails at
    once, from a pod as from the node: it never leaves by the host's default route (where this
    machine's egress proxy accepted it and answered an empty 404, which the gateway pooled)."""
    namespace, pod = strangers[0]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "nobody", "namespace": namespace},
        "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 8081}]},
    }
    _kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(service))
    ip = _kubectl(cluster, "-n", namespace, "get", "service", "nobody", "-o",
                  "jsonpath={.spec.clusterIP}").strip()  # fmt: skip
    target = [("no endpoints", ip, 8081)]
    # from the node: kube-proxy's REJECT, once it has synced the new Service
    wait_for(lambda: _probe_from_node(target)["no endpoints"] != OPEN, within=30,
             what="kube-proxy refusing the Service from the node")  # fmt: skip
    started = time.monotonic()
    states = _probe_from(cluster, namespace, pod, target)
    took = time.monotonic() - started
    print(f"\na Service without endpoints, from a pod: {states} in {took:.1f} s")
    assert states["no endpoints"] != OPEN, states
    assert not states["no endpoints"].startswith("timed out"), states
