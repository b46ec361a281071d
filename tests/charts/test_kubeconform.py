"""Static checks of the chart: `helm lint --strict`, every values file in `charts/gozon/ci/`
rendered and validated by kubeconform (strict: an unknown field anywhere fails) against the
Kubernetes 1.37 schemas and the CRDs of k8s/crds, and the chart's helm-unittest suites.

The validator itself is checked too: the same pipeline refuses a Deployment and a Strimzi
Kafka with a misspelt field, so a green run means the schemas were really applied.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.charts.support import Helm, Schemas, api_versions, ci_values_files, run

VALUES = ci_values_files()


def test_the_chart_keeps_a_values_matrix() -> None:
    names = [p.name for p in VALUES]
    assert names, "charts/gozon/ci/*.yaml: the values files CI renders are missing"


def test_lint_strict_with_defaults(helm: Helm, chart: Path) -> None:
    helm("lint", "--strict", str(chart))


@pytest.mark.parametrize("values", VALUES, ids=[p.stem for p in VALUES])
def test_lint_strict(helm: Helm, chart: Path, values: Path) -> None:
    helm("lint", "--strict", str(chart), "-f", str(values))


def render(helm: Helm, chart: Path, values: Path | None = None) -> str:
    args = ["template", "gozon", str(chart), "--namespace", "gozon", "--kube-version", "1.37.0"]
    args += api_versions()
    if values is not None:
        args += ["-f", str(values)]
    return helm(*args).stdout


def validate(kubeconform: list[str], manifests: str) -> list[dict[str, str]]:
    """kubeconform's per-resource results; fails unless every resource is valid."""
    done = run([*kubeconform, "-verbose", "-"], stdin=manifests, check=False)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"kubeconform printed no report (exit {done.returncode}):\n{done.stderr}")
    resources: list[dict[str, str]] = report.get("resources", [])
    bad = [r for r in resources if r.get("status") != "statusValid"]
    assert not bad, "kubeconform: " + json.dumps(bad, indent=2)
    assert done.returncode == 0, done.stdout + done.stderr
    return resources


@pytest.mark.parametrize("values", VALUES, ids=[p.stem for p in VALUES])
def test_rendered_manifests_are_valid(
    helm: Helm, chart: Path, kubeconform: list[str], values: Path
) -> None:
    manifests = render(helm, chart, values)
    documents = [d for d in yaml.safe_load_all(manifests) if d]
    assert documents, f"{values.name} renders nothing"
    resources = validate(kubeconform, manifests)
    # every rendered document was checked: none skipped for a missing schema
    assert len(resources) == len(documents)


def test_chart_tests_render_valid_manifests(
    helm: Helm, chart: Path, kubeconform: list[str]
) -> None:
    """The defaults, including hooks and the `helm test` Pod (`helm template` prints both)."""
    manifests = render(helm, chart)
    validate(kubeconform, manifests)


def test_unittest_suites(helm: Helm, chart: Path) -> None:
    suites = sorted((chart / "tests").rglob("*_test.yaml"))
    assert suites, f"{chart}/tests/*_test.yaml: the helm-unittest suites are missing"
    done = helm("unittest", "--strict", str(chart))  # exits non-zero on any failure
    summary = [line for line in done.stdout.splitlines() if line.startswith("Tests:")]
    assert summary, done.stdout
    assert "failed" not in summary[0], done.stdout


# --------------------------------------------------------------------------- the validator

BAD_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  replicas: 1
  selector: {matchLabels: {app: bad}}
  template:
    metadata: {labels: {app: bad}}
    spec:
      containers:
        - name: app
          image: gozon:0.1.0
          readinessProbe: {httpGet: {path: /health/ready, port: 8080}, periodSecond: 5}
"""

BAD_KAFKA = """
apiVersion: kafka.strimzi.io/v1
kind: KafkaTopic
metadata: {name: orders, labels: {strimzi.io/cluster: gozon}}
spec:
  partitions: 3
  replicas: 1
  retentionMs: 604800000
"""


@pytest.mark.parametrize(
    ("manifest", "field"),
    [(BAD_DEPLOYMENT, "periodSecond"), (BAD_KAFKA, "retentionMs")],
    ids=["deployment", "strimzi-topic"],
)
def test_validator_refuses_unknown_fields(
    kubeconform: list[str], manifest: str, field: str
) -> None:
    done = run([*kubeconform, "-"], stdin=manifest, check=False)
    assert done.returncode != 0
    assert field in done.stdout + done.stderr


def test_crd_schemas_cover_the_strimzi_and_monitoring_kinds(schemas: Schemas) -> None:
    for kind in (
        "kafka.strimzi.io/v1/Kafka",
        "kafka.strimzi.io/v1/KafkaNodePool",
        "kafka.strimzi.io/v1/KafkaTopic",
        "kafka.strimzi.io/v1/KafkaUser",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "monitoring.coreos.com/v1/PodMonitor",
        "monitoring.coreos.com/v1/PrometheusRule",
    ):
        assert kind in schemas.crd_kinds
