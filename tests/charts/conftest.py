"""Fixtures of the chart tests (`make test-chart`): the tools, the chart, the CRD schemas, and a
real Kubernetes API server of the session's own.

The tools (helm, the helm-unittest plugin, kubeconform, the Kubernetes JSON schemas, etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok) are built by
`scripts/k8s-tools` into the tools cache; `make test-chart` runs it first. A missing tool
fails the test that needs it with the command that installs it; nothing is skipped.

Helm runs with homes of the session's own (no repository, plugin or registry configuration of
the person running the tests leaks in); plugins come from the tools cache.

The control plane (scripts/kube_cluster.py) starts once per session, lazily, in a temporary
folder, on free loopback ports, and stops at the end. When a test that used it fails, its
report gets the namespace's events, the pods' states, `helm status`, and the tail of each
component's log, so a CI failure can be read without rerunning it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from scripts.kube_cluster import LocalCluster, tools_bin, tools_cache
from tests.charts.support import (
    CRD_DIR,
    KUBE_VERSION,
    Helm,
    Schemas,
    chart_dir,
    collect_diagnostics,
    crd_documents,
    run,
    tool,
    write_crd_schemas,
)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "HELM_PLUGINS": str(tools_cache() / "helm" / "plugins"),
        "PATH": f"{tools_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("KUBECONFIG", None)
    return Helm(env=env, binary=tool("helm"))


@pytest.fixture(scope="session")
def chart() -> Path:
    path = chart_dir()
    if not (path / "Chart.yaml").exists():
        pytest.fail(f"no chart at {path}")
    return path


# --------------------------------------------------------------------------- schemas


@pytest.fixture(scope="session")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Schemas:
    kubernetes = tools_cache() / "schemas" / "kubernetes" / f"v{KUBE_VERSION}-local-strict"
    if not (kubernetes / "_definitions.json").exists():
        pytest.fail(f"{kubernetes} is missing: run scripts/k8s-tools schemas")
    crds = tmp_path_factory.mktemp("crd-schemas")
    return Schemas(kubernetes=kubernetes, crds=crds, crd_kinds=write_crd_schemas(crds))


@pytest.fixture(scope="session")
def kubeconform(schemas: Schemas) -> list[str]:
    """The kubeconform command line: strict, every kind must have a schema, JSON output."""
    return [
        tool("kubeconform"),
        "-strict",
        "-summary",
        "-output",
        "json",
        "-kubernetes-version",
        KUBE_VERSION,
        *schemas.locations(),
    ]


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    for name in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "kubectl",
    ):
        tool(name)
    data = Path(tempfile.mkdtemp(prefix="gozon-kube-"))
    local = LocalCluster(data)
    try:
        local.start()
    except Exception:
        local.stop()
        raise
    yield local
    local.stop()
    if os.environ.get("GOZON_KEEP_KUBE_DIR"):
        print(f"\nlocal cluster data and logs kept in {data}")
    else:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def kube_api(cluster: LocalCluster) -> client.ApiClient:
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig)
    )
    return api


@pytest.fixture(scope="session")
def kubectl(cluster: LocalCluster) -> list[str]:
    return [tool("kubectl"), "--kubeconfig", str(cluster.kubeconfig)]


@pytest.fixture(scope="session")
def crds_applied(kubectl: list[str], kube_api: client.ApiClient) -> list[str]:
    """The CRDs of k8s/crds applied (server-side: Strimzi's Kafka CRD is too big for the
    client-side annotation) and Established."""
    names = []
    for crd in crd_documents():
        metadata = crd["metadata"]
        assert isinstance(metadata, dict)
        names.append(str(metadata["name"]))
    run(
        [
            *kubectl,
            "apply",
            "--server-side",
            "--field-manager=gozon-tests",
            "-R",
            "-f",
            str(CRD_DIR),
        ]
    )
    run(
        [
            *kubectl,
            "wait",
            "--for=condition=Established",
            "--timeout=120s",
            *[f"crd/{n}" for n in names],
        ]
    )
    return names


@pytest.fixture
def diagnostics(
    request: pytest.FixtureRequest, cluster: LocalCluster, kube_api: client.ApiClient
) -> Iterator[list[str]]:
    """Namespaces to describe if the test fails: a test appends the ones it used."""
    namespaces: list[str] = []
    yield namespaces
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    request.node.add_report_section(
        "call", "cluster", collect_diagnostics(cluster, kube_api, namespaces)
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps each phase's report on the test item, for `diagnostics` to see a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
