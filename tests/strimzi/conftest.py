"""Fixtures of `make test-strimzi`: the chart's default Kafka path on a real one-node Kubernetes.

`scripts/test-strimzi` builds Strimzi 1.2.0's operator and Kafka images (scripts/strimzi-build),
starts the node (k8s/node-cluster) and imports the images before pytest runs. The session then:

  1. makes a namespace with a random name, and for the broker's volume a StorageClass and a
     hostPath PersistentVolume bound in advance to the claim Strimzi will make (the node has
     no volume provisioner);
  2. installs Strimzi's cluster operator from the source's own Helm chart
     (packaging/helm-charts/helm3/strimzi-kafka-operator: every CRD, StrimziPodSet included),
     watching that namespace, its images the ones built here;
  3. installs the chart with `kafka.mode` at its default (Strimzi) and tests/strimzi/values.yaml
     (one broker), `helm install --wait`: the relays and consumers only become ready once the
     operator has made the Kafka, its topics and users;
  4. uninstalls both and deletes the namespace, the volume and its folder at the end.

The failure report hook and the Cluster helpers are tests/k8s's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from scripts.kube_node import NodeCluster
from tests.charts.support import Helm, chart_dir
from tests.k8s.conftest import (  # noqa: F401  # fixtures and the report hook, shared
    _CLUSTER,
    Cluster,
    diagnostics,
    helm,
    node,
    pytest_runtest_makereport,
    wait_for,
)

HERE = Path(__file__).resolve().parent
RELEASE = "gozon"
CLUSTER_NAME = RELEASE  # gozon.kafkaClusterName: the release's full name
POOL = f"{CLUSTER_NAME}-dual"
BROKER_POD = f"{CLUSTER_NAME}-{POOL}-0"
STORAGE_CLASS = "gozon-strimzi-test"
IMAGE = os.environ.get("GOZON_IMAGE", "gozon:0.1.0")
POSTGRES_IMAGE = os.environ.get("GOZON_POSTGRES_IMAGE", "gozon-offline/postgres:15")
STRIMZI_SRC = Path(os.environ.get("GOZON_STRIMZI_SRC", "/nonexistent"))
STRIMZI_REPOSITORY = os.environ.get("GOZON_STRIMZI_REPOSITORY", "gozon-strimzi")
STRIMZI_TAG = os.environ.get("GOZON_STRIMZI_VERSION", "1.2.0")
INSTALL_TIMEOUT_S = int(os.environ.get("GOZON_K8S_INSTALL_TIMEOUT_S", "1200"))
GROUP, VERSION = "kafka.strimzi.io", "v1"


def strimzi_chart() -> Path:
    return STRIMZI_SRC / "packaging" / "helm-charts" / "helm3" / "strimzi-kafka-operator"


class StrimziCluster(Cluster):
    """tests/k8s's Cluster with Strimzi's custom resources."""

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def resource(self, plural: str, name: str) -> dict[str, Any]:
        obj: Any = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )
        return dict(obj)

    def resources(self, plural: str) -> list[dict[str, Any]]:
        objs: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural
        )
        return list(objs["items"])

    def ready(self, plural: str, name: str) -> bool:
        """The resource's Ready condition is True for its current generation."""
        try:
            obj = self.resource(plural, name)
        except client.ApiException:
            return False
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj["metadata"].get("generation"):
            return False
        return any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )


def _volume(namespace: str, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A StorageClass without provisioner and a hostPath volume bound to the broker's claim
    (Strimzi names it data-<volume id>-<pod>)."""
    storage_class = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Retain",
    }
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-kafka-0"},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": namespace, "name": f"data-0-{BROKER_POD}"},
            "hostPath": {"path": str(folder), "type": "Directory"},
        },
    }
    return storage_class, volume


@pytest.fixture(scope="session")
def cluster(node: NodeCluster, helm: Helm) -> Iterator[StrimziCluster]:  # noqa: F811
    """Strimzi's operator and the release, installed once, uninstalled at the end."""
    if not (strimzi_chart() / "Chart.yaml").exists():
        pytest.fail(
            f"no Strimzi chart under {STRIMZI_SRC}: scripts/strimzi-build makes it, "
            "scripts/test-strimzi passes GOZON_STRIMZI_SRC"
        )
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(node.kubeconfig)
    )
    core = client.CoreV1Api(api)
    storage = client.StorageV1Api(api)
    namespace = f"gozon-strimzi-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    c = StrimziCluster(
        node=node,
        api=api,
        core=core,
        apps=client.AppsV1Api(api),
        batch=client.BatchV1Api(api),
        namespace=namespace,
        helm=helm,
    )
    _CLUSTER.append(c)
    folder = node.data_dir / "volumes" / namespace / "kafka-0"
    storage_class, volume = _volume(namespace, folder)

    def gone() -> bool:
        try:
            core.read_namespace(namespace)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    def teardown() -> None:
        _CLUSTER.clear()
        # checked: an uninstall that hangs (e.g. on KafkaTopic finalizers) is a defect
        helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "5m")
        # the operator deletes the Kafka's pods and (deleteClaim) its claim, then goes
        helm("uninstall", "strimzi", "--namespace", namespace, "--wait", check=False)
        core.delete_namespace(namespace)
        wait_for(gone, within=300, what=f"namespace {namespace} deleted", every=2)
        try:
            core.delete_persistent_volume(volume["metadata"]["name"])
        except client.ApiException as exc:
            if exc.status != 404:
                raise
        shutil.rmtree(folder.parent, ignore_errors=True)
        api.close()  # type: ignore[no-untyped-call]

    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)  # the broker runs as uid 1001
        try:
            storage.create_storage_class(storage_class)  # type: ignore[arg-type]
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        core.create_persistent_volume(volume)  # type: ignore[arg-type]
        started = time.monotonic()
        helm(
            "install", "strimzi", str(strimzi_chart()), "--namespace", namespace,
            "--set", "defaultImageRegistry=",
            "--set", f"defaultImageRepository={STRIMZI_REPOSITORY}",
            "--set", f"defaultImageTag={STRIMZI_TAG}", "--set", "image.imagePullPolicy=Never",
            # The chart's liveness probe (10 s delay, every 30 s, 1 s timeout, 3 failures)
            # killed the operator's JVM again and again while this 2-core machine was loaded
            # (a start takes over 80 s there): the Kafka was never made. Killed only after
            # 2 min + 3 min unanswered here.
            "--set", "livenessProbe.initialDelaySeconds=120",
            "--set", "livenessProbe.periodSeconds=60",
            "--wait", "--timeout", f"{INSTALL_TIMEOUT_S}s",
            timeout=INSTALL_TIMEOUT_S + 60,
        )  # fmt: skip
        print(f"\nStrimzi's operator installed and ready: {time.monotonic() - started:.0f} s")
        repository, _, tag = IMAGE.rpartition(":")
        pg_repository, _, pg_tag = POSTGRES_IMAGE.rpartition(":")
        started = time.monotonic()
        helm(
            "install", RELEASE, str(chart_dir()), "--namespace", namespace,
            "-f", str(HERE / "values.yaml"),
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", f"postgresql.bundled.image.repository={pg_repository}",
            "--set-string", f"postgresql.bundled.image.tag={pg_tag}",
            "--wait", "--timeout", f"{INSTALL_TIMEOUT_S}s",
            timeout=INSTALL_TIMEOUT_S + 60,
        )  # fmt: skip
        print(f"helm install --wait (Kafka through Strimzi): {time.monotonic() - started:.0f} s")
    except BaseException:
        print(diagnostics(c), flush=True)
        teardown()
        raise
    try:
        yield c
    finally:
        teardown()
