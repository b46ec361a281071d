"""The chart on a real Kubernetes API server (the local control plane, k8s/local-cluster):
Strimzi's and prometheus-operator's CRDs applied, then `helm install --wait` (the migration
hooks run and their Jobs complete), `helm upgrade --wait` (a rolling update of every
Deployment, the pre-upgrade hooks again), `helm uninstall --wait` (nothing of the release
left). The server itself refuses a Strimzi resource that breaks the CRD's schema.

kwok plays the kubelets, so pods become Ready and Job pods Succeed without an image: what
is checked is what the API server, the controllers and the scheduler make of the chart, not
the processes inside the containers (the compose and e2e suites run those).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.charts.support import Helm

# Starting the control plane and `helm install --wait` take minutes on a busy machine; every
# wait inside has its own deadline that names what it waited for.
pytestmark = pytest.mark.timeout(1200)

RELEASE = "gozon"
# The HPA controller has no metrics API to ask on this cluster (nor on a bare kind cluster):
# these warnings say so and nothing else.
EXPECTED_WARNINGS = {"FailedGetResourceMetric", "FailedComputeMetricsReplicas"}


def _status_write_conflict(event: Any) -> bool:
    """A controller wrote an object's status from a copy that `helm upgrade` had just changed
    under it: the API server refuses the write with 409 Conflict ("the object has been
    modified"), the controller warns `FailedUpdateStatus` and writes again from a fresh copy on
    its next pass. A refusal for any other reason, or any other event, still fails the test."""
    return event.reason == "FailedUpdateStatus" and "the object has been modified" in (
        event.message or ""
    )


def wait_for(
    check: Callable[[], Any],
    *,
    what: str,
    timeout: float = 300,
    explain: Callable[[], object] = lambda: "",
) -> Any:
    """Polls until `check` returns something truthy; fails naming `what` and `explain()`."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}: {explain()}")
        time.sleep(delay)
        delay = min(delay * 2, 2)


def test_crds_are_established(crds_applied: list[str], kube_api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    for name in crds_applied:
        crd: Any = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions.get("Established") == "True", name


@pytest.mark.parametrize(
    ("plural", "body", "complaint"),
    [
        (
            "kafkatopics",
            {"kind": "KafkaTopic", "spec": {"partitions": "many", "replicas": 1}},
            "spec.partitions",
        ),
        (
            "kafkas",
            {"kind": "Kafka", "spec": {"kafka": {"listeners": "plain"}}},
            "spec.kafka.listeners",
        ),
        (
            "kafkanodepools",
            {"kind": "KafkaNodePool", "spec": {"replicas": 1, "roles": ["leader"]}},
            "spec.roles",
        ),
    ],
    ids=["topic-partitions-not-a-number", "kafka-listeners-not-a-list", "nodepool-bad-role"],
)
def test_server_refuses_a_wrong_strimzi_resource(
    crds_applied: list[str],
    kube_api: client.ApiClient,
    plural: str,
    body: dict[str, Any],
    complaint: str,
) -> None:
    objects = client.CustomObjectsApi(kube_api)
    resource = {
        "apiVersion": "kafka.strimzi.io/v1",
        "metadata": {"name": "wrong", "labels": {"strimzi.io/cluster": "gozon"}},
        **body,
    }
    with pytest.raises(client.ApiException) as refused:
        objects.create_namespaced_custom_object(
            "kafka.strimzi.io", "v1", "default", plural, resource, field_validation="Strict"
        )
    assert refused.value.status == 422, refused.value.body
    assert complaint in str(refused.value.body)


def test_server_refuses_an_unknown_strimzi_field(
    crds_applied: list[str], kube_api: client.ApiClient
) -> None:
    objects = client.CustomObjectsApi(kube_api)
    topic = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "misspelt", "labels": {"strimzi.io/cluster": "gozon"}},
        "spec": {"partitions": 3, "replicas": 1, "retentionMs": 1000},
    }
    with pytest.raises(client.ApiException) as refused:
        objects.create_namespaced_custom_object(
            "kafka.strimzi.io", "v1", "default", "kafkatopics", topic, field_validation="Strict"
        )
    assert refused.value.status == 400, refused.value.body
    assert "retentionMs" in str(refused.value.body)


# --------------------------------------------------------------------------- the release


class Release:
    """What the tests read back from the server about one installed release."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.apps = client.AppsV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.selector = f"app.kubernetes.io/instance={RELEASE}"

    def deployments(self) -> list[Any]:
        return list(
            self.apps.list_namespaced_deployment(self.namespace, label_selector=self.selector).items
        )

    def statefulsets(self) -> list[Any]:
        return list(
            self.apps.list_namespaced_stateful_set(
                self.namespace, label_selector=self.selector
            ).items
        )

    def rolled_out(self) -> list[str]:
        """Deployments and StatefulSets whose rollout is not finished (empty when all are)."""
        pending = []
        for d in self.deployments():
            s = d.status
            want = d.spec.replicas
            available = {c.type: c.status for c in s.conditions or []}.get("Available")
            if (
                (s.observed_generation or 0) < d.metadata.generation
                or (s.updated_replicas or 0) != want
                or (s.available_replicas or 0) != want
                or available != "True"
            ):
                pending.append(f"Deployment/{d.metadata.name}")
        for st in self.statefulsets():
            s = st.status
            if (s.observed_generation or 0) < st.metadata.generation or (
                s.ready_replicas or 0
            ) != st.spec.replicas:
                pending.append(f"StatefulSet/{st.metadata.name}")
        return pending

    def warnings(self) -> list[str]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector="type=Warning"
        ).items
        return [
            f"{e.reason} {e.involved_object.kind}/{e.involved_object.name}: {e.message}"
            for e in events
            if e.reason not in EXPECTED_WARNINGS
            and not self._ip_repair_race(e)
            and not _status_write_conflict(e)
        ]

    def _ip_repair_race(self, event: Any) -> bool:
        """The API server's ClusterIP repair controller checks each new Service against its
        own cache of IPAddress objects; on a busy machine that cache can lag the Service's, and
        it warns `ClusterIPNotAllocated … repairing` for an address the allocator had in fact
        created with the Service (the repair's own create then fails as already existing).
        Excused only when every ClusterIP of the Service has its IPAddress object, naming that
        Service and created no later than the Service (to the second: the allocator writes it
        first); an address missing, someone else's, or made afterwards still fails the test."""
        if event.reason != "ClusterIPNotAllocated" or event.involved_object.kind != "Service":
            return False
        name = event.involved_object.name
        try:
            service = self.core.read_namespaced_service(name, self.namespace)
            ips = list(service.spec.cluster_ips or []) if service.spec else []
            addresses = [self.networking.read_ip_address(ip) for ip in ips]
        except client.ApiException:
            return False
        born = service.metadata.creation_timestamp if service.metadata else None
        if not addresses or born is None:
            return False
        for address in addresses:
            parent = address.spec.parent_ref
            made = address.metadata.creation_timestamp if address.metadata else None
            if (parent.resource, parent.namespace, parent.name) != (
                "services",
                self.namespace,
                name,
            ) or (made is None or made > born):
                return False
        return True

    def jobs(self) -> dict[str, str]:
        """The Jobs there now: name → uid."""
        found = self.batch.list_namespaced_job(self.namespace).items
        return {str(j.metadata.name): str(j.metadata.uid) for j in found if j.metadata}

    def completed_jobs(self) -> set[tuple[str, str]]:
        """(name, uid) of the Jobs the job controller reported complete: events outlive the
        hook Jobs Helm deletes, and a Job recreated under the same name has a new uid."""
        events = self.core.list_namespaced_event(
            self.namespace, field_selector="involvedObject.kind=Job,reason=Completed"
        ).items
        return {(str(e.involved_object.name), str(e.involved_object.uid)) for e in events}

    def leftovers(self) -> list[str]:
        """Objects of the release still present. Excepted, as Helm and Kubernetes document:
        objects annotated `helm.sh/resource-policy: keep` (the bundled databases' password
        Secrets, kept with their data) and the volumes claimed by StatefulSets."""
        found = [f"Deployment/{d.metadata.name}" for d in self.deployments()]
        found += [f"StatefulSet/{s.metadata.name}" for s in self.statefulsets()]
        for kind, lister in (
            ("Service", self.core.list_namespaced_service),
            ("ConfigMap", self.core.list_namespaced_config_map),
            ("Secret", self.core.list_namespaced_secret),
            ("Pod", self.core.list_namespaced_pod),
        ):
            items: list[Any] = lister(self.namespace, label_selector=self.selector).items
            found += [
                f"{kind}/{o.metadata.name}"
                for o in items
                if (o.metadata.annotations or {}).get("helm.sh/resource-policy") != "keep"
            ]
        return found


# The defaults (Strimzi, bundled PostgreSQL: the migrations are Jobs of the release) and the
# external mode (the migrations are pre-install/pre-upgrade hook Jobs with their own Secret and
# ServiceAccount). Nothing connects to the external addresses: kwok runs no container.
SCENARIOS = {"defaults": None, "external": "external-values.yaml"}


@dataclass(frozen=True)
class Scenario:
    namespace: str
    values: list[str]


@pytest.fixture(scope="class", params=list(SCENARIOS), ids=list(SCENARIOS))
def scenario(
    request: pytest.FixtureRequest, kube_api: client.ApiClient, chart: Path, crds_applied: list[str]
) -> Scenario:
    name = f"gozon-{request.param}"
    values_file = SCENARIOS[request.param]
    client.CoreV1Api(kube_api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )
    values = ["-f", str(chart / "ci" / values_file)] if values_file else []
    return Scenario(namespace=name, values=values)


@pytest.fixture(scope="class")
def release(kube_api: client.ApiClient, scenario: Scenario) -> Release:
    return Release(kube_api, scenario.namespace)


@pytest.fixture(scope="module")
def kube_helm(helm: Helm, cluster: Any) -> Helm:
    return Helm(env={**helm.env, "KUBECONFIG": str(cluster.kubeconfig)}, binary=helm.binary)


def helm_install_args(chart: Path, scenario: Scenario) -> list[str]:
    return [RELEASE, str(chart), "--namespace", scenario.namespace, *scenario.values]


WAIT = ["--wait", "--timeout", "10m"]


class TestInstallUpgradeUninstall:
    """In order: each step starts from the state the previous one left."""

    def test_install(
        self,
        kube_helm: Helm,
        chart: Path,
        scenario: Scenario,
        release: Release,
        diagnostics: list[str],
    ) -> None:
        diagnostics.append(scenario.namespace)
        kube_helm("install", *helm_install_args(chart, scenario), *WAIT)
        assert not release.rolled_out(), release.rolled_out()
        assert release.deployments(), "the release has no Deployment"
        hook_jobs = release.completed_jobs()
        assert hook_jobs, "no hook Job completed"
        status = kube_helm("status", RELEASE, "-n", scenario.namespace, "-o", "json").stdout
        assert '"status":"deployed"' in status.replace(" ", "")
        assert not release.warnings(), release.warnings()

    def test_upgrade_rolls_every_deployment(
        self,
        kube_helm: Helm,
        chart: Path,
        scenario: Scenario,
        release: Release,
        diagnostics: list[str],
    ) -> None:
        diagnostics.append(scenario.namespace)
        before = {d.metadata.name: d.metadata.generation for d in release.deployments()}
        assert before, "install left no Deployment to upgrade"
        jobs_before = release.completed_jobs()
        migration_jobs_before = release.jobs()
        kube_helm(
            "upgrade",
            *helm_install_args(chart, scenario),
            *WAIT,
            "--reuse-values",
            "--set-string",
            "common.podAnnotations.gozon\\.dev/upgrade-check=2",
        )
        wait_for(
            lambda: not release.rolled_out(),
            what="the rollout after the upgrade",
            explain=release.rolled_out,
        )
        after = {d.metadata.name: d.metadata.generation for d in release.deployments()}
        assert after.keys() == before.keys()
        assert all(after[name] > before[name] for name in before), (before, after)
        for d in release.deployments():
            annotations = d.spec.template.metadata.annotations or {}
            assert annotations.get("gozon.dev/upgrade-check") == "2", d.metadata.name
        if scenario.values:
            # external: the hooks run again at every upgrade (Jobs with new uids completed)
            wait_for(
                lambda: release.completed_jobs() - jobs_before, what="the upgrade's migration Jobs"
            )
        else:
            # bundled: nothing the Jobs run changed, so the revision-2 render names the same
            # Jobs with the same spec, and Kubernetes keeps the completed objects (what a
            # `helm template`-based GitOps tool needs: no patch of an immutable spec)
            assert release.jobs() == migration_jobs_before
        history = kube_helm("history", RELEASE, "-n", scenario.namespace, "-o", "json").stdout
        assert '"revision":2' in history.replace(" ", "")
        assert not release.warnings(), release.warnings()

    def test_upgrade_to_a_new_image_runs_the_migrations_again(
        self,
        kube_helm: Helm,
        chart: Path,
        scenario: Scenario,
        release: Release,
        diagnostics: list[str],
    ) -> None:
        diagnostics.append(scenario.namespace)
        jobs_before = release.completed_jobs()
        names_before = set(release.jobs())
        kube_helm(
            "upgrade",
            *helm_install_args(chart, scenario),
            *WAIT,
            "--reuse-values",
            "--set-string",
            "image.tag=0.1.1-upgrade-check",
        )
        wait_for(
            lambda: not release.rolled_out(),
            what="the rollout after the upgrade",
            explain=release.rolled_out,
        )
        wait_for(
            lambda: release.completed_jobs() - jobs_before, what="the upgrade's migration Jobs"
        )
        if not scenario.values:
            # bundled: new Jobs, named by the new spec; the previous image's are pruned
            wait_for(
                lambda: len(release.jobs()) == 2 and not names_before & set(release.jobs()),
                what="the previous image's migration Jobs to be replaced",
                explain=release.jobs,
            )
        history = kube_helm("history", RELEASE, "-n", scenario.namespace, "-o", "json").stdout
        assert '"revision":3' in history.replace(" ", "")
        assert not release.warnings(), release.warnings()

    def test_uninstall_leaves_nothing(
        self,
        kube_helm: Helm,
        scenario: Scenario,
        release: Release,
        diagnostics: list[str],
    ) -> None:
        diagnostics.append(scenario.namespace)
        kube_helm("uninstall", RELEASE, "-n", scenario.namespace, "--wait", "--timeout", "5m")
        wait_for(
            lambda: not release.leftovers(),
            what="the release's objects to go",
            explain=release.leftovers,
        )
        listed = kube_helm("list", "-n", scenario.namespace, "-q").stdout.split()
        assert RELEASE not in listed
