"""Fixtures of `make test-k8s`: the chart installed on a real one-node Kubernetes.

The node (scripts/kube_node.py: containerd, kubelet, kube-proxy, CoreDNS on the local control
plane) is started by `scripts/test-k8s` before pytest runs, and the images are imported into
its containerd there; a node that is not running fails the session with the command that
starts it. Everything else is the session's own: a namespace with a random name, a one-node
KRaft broker in it (the locally built Kafka image), and the release, installed once with
`helm install --wait` and uninstalled at the end (the namespace is deleted and waited for).

From this machine the test reaches the cluster the way a node does: Service addresses through
kube-proxy's rules (the gateway's ClusterIP), pod addresses over the CNI bridge (the
databases, for the invariant checker).

When a test fails, its report gets the namespace's events, every pod's state and the last lines
of every container's log (the previous run's too, for a restarted container), read through the
API server and the kubelet.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from scripts.kube_cluster import tools_bin, tools_cache
from scripts.kube_node import NodeCluster, default_node_dir
from tests.charts.support import Helm, chart_dir, tool

HERE = Path(__file__).resolve().parent
RELEASE = "gozon"
KAFKA_IMAGE = os.environ.get("GOZON_KAFKA_IMAGE", "gozon-offline/kafka:4.4.0")
POSTGRES_IMAGE = os.environ.get("GOZON_POSTGRES_IMAGE", "gozon-offline/postgres:15")
IMAGE = os.environ.get("GOZON_IMAGE", "gozon:0.1.0")
DEPLOYMENTS = tuple(
    f"{RELEASE}-{p}"
    for p in (
        "gateway",
        "orders-api",
        "orders-relay",
        "orders-consumer",
        "payments-api",
        "payments-relay",
        "payments-consumer",
    )
)
INSTALL_TIMEOUT_S = int(os.environ.get("GOZON_K8S_INSTALL_TIMEOUT_S", "900"))


def wait_for(
    predicate: Callable[[], bool], *, within: float, what: str, every: float = 1.0
) -> None:
    """Polls `predicate` until true; fails naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f} s")
        time.sleep(every)


@dataclass(frozen=True)
class Cluster:
    node: NodeCluster
    api: client.ApiClient
    core: client.CoreV1Api
    apps: client.AppsV1Api
    batch: client.BatchV1Api
    namespace: str
    helm: Helm

    def deployment_available(self, name: str, replicas: int | None = None) -> bool:
        d: Any = self.apps.read_namespaced_deployment(name, self.namespace)
        want = d.spec.replicas if replicas is None else replicas
        s = d.status
        return bool(
            s.observed_generation == d.metadata.generation
            and (s.updated_replicas or 0) == want
            and (s.available_replicas or 0) == want
            and (s.replicas or 0) == want
        )

    def pods(self, selector: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def service_ip(self, name: str) -> str:
        svc: Any = self.core.read_namespaced_service(name, self.namespace)
        return str(svc.spec.cluster_ip)

    def pod_ip(self, name: str) -> str:
        pod: Any = self.core.read_namespaced_pod(name, self.namespace)
        return str(pod.status.pod_ip)


def diagnostics(cluster: Cluster, tail: int = 40) -> str:
    core, ns = cluster.core, cluster.namespace
    lines: list[str] = [f"== namespace {ns}: events"]
    try:
        events: Any = core.list_namespaced_event(ns).items
        for ev in sorted(events, key=lambda e: str(e.last_timestamp or e.event_time or "")):
            obj = ev.involved_object
            lines.append(f"  {ev.type:<8} {ev.reason:<22} {obj.kind}/{obj.name}: {ev.message}")
        pods: Any = core.list_namespaced_pod(ns).items
        lines.append(f"== namespace {ns}: pods")
        for pod in pods:
            states = [
                f"{c.name}: ready={c.ready} restarts={c.restart_count} {c.state.to_dict()}"
                for c in pod.status.container_statuses or []
            ]
            lines.append(f"  {pod.metadata.name}: {pod.status.phase} {states}")
        for pod in pods:
            for c in pod.spec.containers:
                for previous in (False, True):
                    try:
                        text = core.read_namespaced_pod_log(
                            pod.metadata.name, ns, container=c.name, tail_lines=tail,
                            previous=previous,
                        )  # fmt: skip
                    except client.ApiException:
                        continue
                    label = "previous run" if previous else "log"
                    lines.append(f"== {pod.metadata.name}/{c.name} ({label}, last {tail} lines)")
                    lines += [f"  {line}" for line in str(text).splitlines()]
    except client.ApiException as exc:
        lines.append(f"  (could not read: {exc.reason})")
    try:
        nodes: Any = core.list_node().items
        for n in nodes:
            conditions = [
                f"{c.type}={c.status}" + (f" ({c.reason})" if c.status != "False" else "")
                for c in n.status.conditions or []
            ]
            taints = [f"{t.key}:{t.effect}" for t in n.spec.taints or []]
            lines.append(f"== node {n.metadata.name}: {' '.join(conditions)}; taints {taints}")
    except client.ApiException as exc:
        lines.append(f"== nodes: could not read ({exc.reason})")
    running = cluster.node.running()
    stopped = [c for c in cluster.node.components if c not in running]
    lines.append(f"== node components not running: {stopped or 'none'}")
    for component in cluster.node.components:
        log = cluster.node.logs / f"{component}.log"
        if log.exists():
            lines.append(f"== {log} (last lines)")
            lines += [f"  {x[:300]}" for x in log.read_text(errors="replace").splitlines()[-10:]]
    return "\n".join(lines)


_CLUSTER: list[Cluster] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _CLUSTER:
        report.sections.append(("kubernetes", diagnostics(_CLUSTER[0])))
    return report


@pytest.fixture(scope="session")
def node() -> NodeCluster:
    cluster = NodeCluster(default_node_dir())
    if cluster.running() != list(cluster.components):
        pytest.fail(
            f"the one-node cluster in {cluster.data_dir} is not running: "
            "k8s/node-cluster start (make test-k8s does it)"
        )
    return cluster


@pytest.fixture(scope="session")
def helm(node: NodeCluster, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "HELM_PLUGINS": str(tools_cache() / "helm" / "plugins"),
        "PATH": f"{tools_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(node.kubeconfig),
    }
    return Helm(env=env, binary=tool("helm"))


def _kafka_objects(namespace: str) -> tuple[dict[str, Any], ...]:
    """One KRaft node (broker and controller), configured as docker-compose.yml's, and its
    NetworkPolicy: the release's pods (its relays and consumers, whose own egress policies
    allow nothing else) and the broker itself may connect, nobody else in the cluster (the
    node may: its probes and the tests)."""
    labels = {"app.kubernetes.io/name": "kafka", "app.kubernetes.io/part-of": "gozon-test"}
    host = f"kafka.{namespace}.svc.cluster.local"
    env = {
        "CLUSTER_ID": "hLMYIorlRk6VX74dU8byww",
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{host}:9092",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
        "KAFKA_NUM_PARTITIONS": "3",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "3",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_HEAP_OPTS": "-Xms256m -Xmx512m",
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "kafka", "labels": labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "enableServiceLinks": False,
                    "containers": [
                        {
                            "name": "kafka",
                            "image": KAFKA_IMAGE,
                            "imagePullPolicy": "Never",
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            "ports": [{"name": "kafka", "containerPort": 9092}],
                            # the listener answers once the broker has started
                            "readinessProbe": {"tcpSocket": {"port": 9092}, "periodSeconds": 2},
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "512Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/kafka/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kafka", "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "kafka", "port": 9092}]},
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "kafka", "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": labels},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}},
                        {"podSelector": {"matchLabels": labels}},
                    ],
                    "ports": [{"port": 9092, "protocol": "TCP"}],
                }
            ],
        },
    }
    return deployment, service, policy


@pytest.fixture(scope="session")
def cluster(node: NodeCluster, helm: Helm) -> Iterator[Cluster]:
    """The release, installed once (`helm install --wait`), uninstalled at the end."""
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(node.kubeconfig)
    )
    core = client.CoreV1Api(api)
    namespace = f"gozon-k8s-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    c = Cluster(
        node=node,
        api=api,
        core=core,
        apps=client.AppsV1Api(api),
        batch=client.BatchV1Api(api),
        namespace=namespace,
        helm=helm,
    )
    _CLUSTER.append(c)

    def gone() -> bool:
        try:
            core.read_namespace(namespace)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    def teardown() -> None:
        _CLUSTER.clear()
        helm("uninstall", RELEASE, "--namespace", namespace, "--wait", check=False)
        core.delete_namespace(namespace)
        wait_for(gone, within=300, what=f"namespace {namespace} deleted", every=2)
        api.close()  # type: ignore[no-untyped-call]

    try:
        deployment, service, policy = _kafka_objects(namespace)
        # the client takes plain dicts as well as its models
        c.apps.create_namespaced_deployment(namespace, deployment)  # type: ignore[arg-type]
        core.create_namespaced_service(namespace, service)  # type: ignore[arg-type]
        client.NetworkingV1Api(api).create_namespaced_network_policy(
            namespace,
            policy,  # type: ignore[arg-type]
        )
        wait_for(
            lambda: c.deployment_available("kafka"),
            within=INSTALL_TIMEOUT_S,
            what="the Kafka broker's Deployment Available",
            every=2,
        )
        repository, _, tag = IMAGE.rpartition(":")
        pg_repository, _, pg_tag = POSTGRES_IMAGE.rpartition(":")
        started = time.monotonic()
        helm(
            "install", RELEASE, str(chart_dir()), "--namespace", namespace,
            "-f", str(HERE / "values.yaml"),
            "--set", f"kafka.external.bootstrapServers=kafka.{namespace}.svc.cluster.local:9092",
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", f"postgresql.bundled.image.repository={pg_repository}",
            "--set-string", f"postgresql.bundled.image.tag={pg_tag}",
            "--wait", "--timeout", f"{INSTALL_TIMEOUT_S}s",
            timeout=INSTALL_TIMEOUT_S + 60,
        )  # fmt: skip
        print(f"\nhelm install --wait: {time.monotonic() - started:.0f} s")
    except BaseException:
        # a failed setup is reported after this fixture has ended, too late for the report
        # hook to read the namespace: what the cluster saw is printed now
        print(diagnostics(c), flush=True)
        teardown()
        raise
    try:
        yield c
    finally:
        teardown()
