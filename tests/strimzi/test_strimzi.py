"""The chart's default Kafka path, reconciled by a real Strimzi 1.2.0 operator (`make
test-strimzi`, docs/kubernetes.md "Verified on a real node").

In order, on one release: the Kafka Ready with its broker in a pod the operator made; the
KafkaTopics Ready and on the broker with their partitions; the KafkaUsers Ready with their
Secrets; every process available, the Kafka ones logged in with SCRAM-SHA-512 as their own
user; one process's credentials refused on another's topic and group (and a wrong password,
and no authentication at all, refused); `helm test`; the broker's pod deleted under load and
recreated by the operator with the invariants clean; `helm upgrade` changing a topic's
retention and the broker's memory, applied by the topic operator and rolled by the cluster
operator.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.charts.support import chart_dir
from tests.faults.load import SteadyLoad
from tests.k8s.conftest import wait_for
from tests.k8s.test_node import _exec, _fund, _settled_and_checked, _until
from tests.strimzi.conftest import (
    BROKER_POD,
    CLUSTER_NAME,
    HERE,
    IMAGE,
    POOL,
    POSTGRES_IMAGE,
    RELEASE,
    STRIMZI_REPOSITORY,
    StrimziCluster,
)

pytestmark = pytest.mark.timeout(2400)

ROOT = Path(__file__).resolve().parents[2]
RICH = tuple(f"strimzi-rich-{n}" for n in range(10))
POOR = ("strimzi-poor-0",)
LOAD_RATE_PER_S = 6.0
KAFKA_PROCESSES = ("orders-relay", "orders-consumer", "payments-relay", "payments-consumer")
TOPICS = (
    "order.created.event",
    "order.created.event.dlq",
    "payment.processed.event",
    "payment.processed.event.dlq",
)
INSPECTOR = f"{CLUSTER_NAME}-test-inspector"

# Run with python3 in a relay's or consumer's pod: aiokafka with the pod's own Kafka settings
# (the ones the chart gives the process), printing one JSON object.
_CLIENT = """
import asyncio, json, os, ssl, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

USER = os.environ.get("INSPECTOR_USER") or os.environ["GOZON_KAFKA_SASL_USERNAME"]

CA = os.environ.get("GOZON_KAFKA_SSL_CA_FILE")

def access(password=None, sasl=True):
    args = {"bootstrap_servers": os.environ["GOZON_KAFKA_BOOTSTRAP_SERVERS"],
            "request_timeout_ms": 20000}
    if CA:  # the listener is TLS: verify the brokers against the cluster CA, as the process does
        args |= {"security_protocol": "SSL", "ssl_context": ssl.create_default_context(cafile=CA)}
    if sasl:
        args |= {"security_protocol": os.environ["GOZON_KAFKA_SECURITY_PROTOCOL"],
                 "sasl_mechanism": os.environ["GOZON_KAFKA_SASL_MECHANISM"],
                 "sasl_plain_username": USER,
                 "sasl_plain_password": password or os.environ.get("INSPECTOR_PASSWORD") or open(
                     os.environ["GOZON_KAFKA_SASL_PASSWORD_FILE"]).read().strip()}
    return args

async def outcome(coro):
    try:
        await asyncio.wait_for(coro, 60)
        return "ok"
    except Exception as exc:
        return type(exc).__name__
"""

_DESCRIBE = (
    _CLIENT
    + """
async def main(topics):
    admin = AIOKafkaAdminClient(**access())
    await admin.start()
    try:
        found = {t["topic"]: {"error": t["error_code"], "partitions": len(t["partitions"])}
                 for t in await admin.describe_topics(topics)}
        configs = {}
        for response in await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]):
            for resource in response.resources:
                configs[resource[3]] = {e[0]: e[1] for e in resource[4]}
        print(json.dumps({"topics": found, "configs": configs}))
    finally:
        await admin.close()

asyncio.run(main(sys.argv[1:]))
"""
)

_TRESPASS = (
    _CLIENT
    + """
async def produce(topic, **kw):
    producer = AIOKafkaProducer(**access(**kw), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"trespass")
    finally:
        await producer.stop()

async def commit(group, topic, **kw):
    consumer = AIOKafkaConsumer(**access(**kw), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): 0})
    finally:
        await consumer.stop()

async def describe(topic, **kw):
    admin = AIOKafkaAdminClient(**access(**kw))
    await admin.start()
    try:
        (t,) = await admin.describe_topics([topic])
        if t["error_code"]:
            raise RuntimeError(f"error {t['error_code']}")
    finally:
        await admin.close()

async def main(own, other_topic, other_group):
    print(json.dumps({
        "own topic described": await outcome(describe(own)),
        "write to the other's topic": await outcome(produce(other_topic)),
        "commit in the other's group": await outcome(commit(other_group, other_topic)),
        "wrong password": await outcome(describe(own, password="not-the-password")),
        "no authentication": await outcome(describe(own, sasl=False)),
    }))

asyncio.run(main(*sys.argv[1:]))
"""
)


def _pod(cluster: StrimziCluster, process: str) -> str:
    pods = [
        p
        for p in cluster.pods(f"app.kubernetes.io/component={process}")
        if p.metadata.deletion_timestamp is None
    ]
    assert pods, f"no pod of {process}"
    return str(pods[0].metadata.name)


def _python(
    cluster: StrimziCluster,
    process: str,
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`script` run with python3 in a pod of `process` (its own credentials, or `env`'s)."""
    prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())]
    out = _exec(cluster, _pod(cluster, process), [*prefix, "python3", "-c", script, *args])
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def inspector(cluster: StrimziCluster) -> dict[str, str]:
    """The test's own KafkaUser, allowed to describe every topic and its configs (no process
    may: the processes' users have exactly their ACLs), as environment for `_python`."""
    user = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaUser",
        "metadata": {"name": INSPECTOR, "labels": {"strimzi.io/cluster": CLUSTER_NAME}},
        "spec": {
            "authentication": {"type": "scram-sha-512"},
            "authorization": {
                "type": "simple",
                "acls": [
                    {
                        "resource": {"type": "topic", "name": "*", "patternType": "literal"},
                        "operations": ["Describe", "DescribeConfigs"],
                    }
                ],
            },
        },
    }
    cluster.custom.create_namespaced_custom_object(
        "kafka.strimzi.io", "v1", cluster.namespace, "kafkausers", user
    )
    wait_for(lambda: cluster.ready("kafkausers", INSPECTOR), within=300, what=INSPECTOR)
    secret: Any = cluster.core.read_namespaced_secret(INSPECTOR, cluster.namespace)
    password = base64.b64decode(secret.data["password"]).decode()
    return {"INSPECTOR_USER": INSPECTOR, "INSPECTOR_PASSWORD": password}


def _broker(cluster: StrimziCluster) -> Any:
    return cluster.core.read_namespaced_pod(BROKER_POD, cluster.namespace)


def _broker_ready(cluster: StrimziCluster, other_than: str | None = None) -> bool:
    try:
        pod = _broker(cluster)
    except Exception:
        return False
    statuses = pod.status.container_statuses or []
    return bool(
        pod.metadata.uid != other_than
        and pod.metadata.deletion_timestamp is None
        and statuses
        and all(s.ready for s in statuses)
    )


def _reconcile(cluster: StrimziCluster) -> subprocess.CompletedProcess[str]:
    """`gozon reconcile` from this machine, against the databases' pod addresses."""
    from tests.k8s.test_node import _database_urls

    orders_url, payments_url = _database_urls(cluster)
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "gozon"), "reconcile"],
        env={
            **os.environ,
            "GOZON_ORDERS_DATABASE_URL": orders_url,
            "GOZON_PAYMENTS_DATABASE_URL": payments_url,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_kafka_ready_with_its_broker_in_a_pod_the_operator_made(cluster: StrimziCluster) -> None:
    assert cluster.ready("kafkas", CLUSTER_NAME)
    kafka = cluster.resource("kafkas", CLUSTER_NAME)
    assert kafka["status"]["kafkaVersion"] == "4.3.1"
    pod = _broker(cluster)
    (owner,) = pod.metadata.owner_references
    assert (owner.kind, owner.name) == ("StrimziPodSet", f"{CLUSTER_NAME}-{POOL}"), owner
    (container,) = pod.spec.containers
    assert container.image.startswith(f"{STRIMZI_REPOSITORY}/kafka:"), container.image
    (status,) = pod.status.container_statuses
    assert status.ready
    assert status.container_id.startswith("containerd://")
    assert pod.spec.node_name == "gozon-node"
    claims = [
        v.persistent_volume_claim.claim_name
        for v in pod.spec.volumes
        if v.persistent_volume_claim is not None
    ]
    assert claims == [f"data-0-{BROKER_POD}"], claims


def test_topics_ready_and_on_the_broker_with_their_partitions(
    cluster: StrimziCluster, inspector: dict[str, str]
) -> None:
    topics = cluster.resources("kafkatopics")
    names = sorted(t["spec"]["topicName"] for t in topics)
    assert names == sorted(TOPICS)
    for t in topics:
        assert cluster.ready("kafkatopics", t["metadata"]["name"]), t["metadata"]["name"]
    seen = _python(cluster, "orders-relay", _DESCRIBE, *TOPICS, env=inspector)
    for topic in TOPICS:
        assert seen["topics"][topic] == {"error": 0, "partitions": 3}, seen
        assert seen["configs"][topic]["min.insync.replicas"] == "1", seen


def test_users_ready_with_their_secrets(cluster: StrimziCluster) -> None:
    names = [u["metadata"]["name"] for u in cluster.resources("kafkausers")]
    users = sorted(n for n in names if n != INSPECTOR)
    assert users == sorted(f"{CLUSTER_NAME}-{p}" for p in KAFKA_PROCESSES)
    for user in users:
        assert cluster.ready("kafkausers", user), user
        secret: Any = cluster.core.read_namespaced_secret(user, cluster.namespace)
        assert {"password", "sasl.jaas.config"} <= set(secret.data), user
        owners = [o.kind for o in secret.metadata.owner_references or []]
        assert owners == ["KafkaUser"], owners


def test_every_process_available_the_kafka_ones_with_scram(cluster: StrimziCluster) -> None:
    for process in (
        "gateway", "orders-api", "payments-api", *KAFKA_PROCESSES,
    ):  # fmt: skip
        assert cluster.deployment_available(f"{RELEASE}-{process}"), process
    for process in KAFKA_PROCESSES:
        pod: Any = cluster.core.read_namespaced_pod(_pod(cluster, process), cluster.namespace)
        env = {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}
        assert env["GOZON_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["GOZON_KAFKA_SSL_CA_FILE"] == "/etc/gozon/kafka-ca/ca.crt"
        assert env["GOZON_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert env["GOZON_KAFKA_SASL_USERNAME"] == f"{CLUSTER_NAME}-{process}"
        # ready = its producer's metadata round trip to the broker works (logged in)
        assert all(s.ready for s in pod.status.container_statuses), process
    listener = cluster.resource("kafkas", CLUSTER_NAME)["spec"]["kafka"]["listeners"][0]
    assert listener["authentication"]["type"] == "scram-sha-512"
    assert (listener["port"], listener["tls"]) == (9093, True)


def test_credentials_are_refused_outside_their_acls(cluster: StrimziCluster) -> None:
    """The orders relay's user may publish order.created.event only: not the payments
    relay's topic, not the payments consumer's group; a wrong password and a client without
    authentication are refused by the listener itself."""
    seen = _python(
        cluster, "orders-relay", _TRESPASS,
        "order.created.event", "payment.processed.event", "payments",
    )  # fmt: skip
    assert seen["own topic described"] == "ok", seen
    assert seen["write to the other's topic"] == "TopicAuthorizationFailedError", seen
    assert seen["commit in the other's group"] == "GroupAuthorizationFailedError", seen
    # refused at login (the error's class differs with how the broker hangs up)
    assert seen["wrong password"] != "ok", seen
    assert seen["no authentication"] != "ok", seen


def test_helm_test_runs_the_saga(cluster: StrimziCluster) -> None:
    done = cluster.helm(
        "test", RELEASE, "--namespace", cluster.namespace, "--logs", "--timeout", "600s",
        timeout=700,
    )  # fmt: skip
    assert "FINISHED" in done.stdout, done.stdout
    assert "3499.01" in done.stdout, done.stdout


async def test_broker_pod_deleted_under_load_is_recreated_by_the_operator(
    cluster: StrimziCluster,
) -> None:
    gateway = f"http://{cluster.service_ip(f'{RELEASE}-gateway')}:8080"
    await _fund(gateway)
    old = _broker(cluster).metadata.uid
    async with SteadyLoad(gateway, (*RICH, *RICH, *POOR), rate_per_s=LOAD_RATE_PER_S) as load:
        await _until(lambda: sum(r.status == 201 for r in load.log) >= 20, 180, "20 orders in")
        cluster.core.delete_namespaced_pod(BROKER_POD, cluster.namespace)
        deleted_at = time.monotonic()
        await _until(lambda: _broker_ready(cluster, other_than=old), 900, "the broker recreated")
        recreated_s = time.monotonic() - deleted_at
        replaced_at = time.time()
        await _until(
            lambda: sum(r.status == 201 and r.sent_at > replaced_at for r in load.log) >= 20,
            600,
            "20 orders after the broker came back",
        )
    await _until(lambda: cluster.ready("kafkas", CLUSTER_NAME), 600, "the Kafka Ready again")
    figures = await _settled_and_checked(cluster, load.log)
    reconciled = await asyncio.to_thread(_reconcile, cluster)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    print(f"\nbroker recreated by the operator in {recreated_s:.0f} s: {figures}")


def test_helm_upgrade_is_rolled_by_the_operator(
    cluster: StrimziCluster, inspector: dict[str, str]
) -> None:
    """A topic's retention and the broker's memory changed through `helm upgrade`: the topic
    operator changes the topic's config on the broker, the cluster operator rolls the broker."""
    old = _broker(cluster).metadata.uid
    topic = f"{CLUSTER_NAME}-order-created-event"
    repository, _, tag = IMAGE.rpartition(":")
    pg_repository, _, pg_tag = POSTGRES_IMAGE.rpartition(":")
    cluster.helm(
        "upgrade", RELEASE, str(chart_dir()), "--namespace", cluster.namespace,
        "-f", str(HERE / "values.yaml"),
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", f"postgresql.bundled.image.repository={pg_repository}",
        "--set-string", f"postgresql.bundled.image.tag={pg_tag}",
        "--set", "kafka.topics.retentionHours=48",
        "--set", "kafka.strimzi.resources.limits.memory=1100Mi",
        "--wait", "--timeout", "900s",
        timeout=960,
    )  # fmt: skip
    want = str(48 * 3_600_000)
    assert cluster.resource("kafkatopics", topic)["spec"]["config"]["retention.ms"] == want
    wait_s = 900.0
    started = time.monotonic()
    asyncio.run(_until(lambda: _broker_ready(cluster, other_than=old), wait_s, "a rolled broker"))
    rolled_s = time.monotonic() - started
    pod = _broker(cluster)
    assert pod.spec.containers[0].resources.limits["memory"] == "1100Mi"
    asyncio.run(_until(lambda: cluster.ready("kafkas", CLUSTER_NAME), 600, "the Kafka Ready"))
    asyncio.run(_until(lambda: cluster.ready("kafkatopics", topic), 600, f"{topic} Ready"))

    def applied() -> bool:
        seen = _python(cluster, "orders-relay", _DESCRIBE, "order.created.event", env=inspector)
        return bool(seen["configs"]["order.created.event"]["retention.ms"] == want)

    asyncio.run(_until(applied, 300, "retention.ms changed on the broker"))
    print(f"\nbroker rolled by the operator in {rolled_s:.0f} s")
