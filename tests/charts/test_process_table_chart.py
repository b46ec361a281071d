"""The chart runs exactly the process table: its Deployments, Services, ports, probes and
migration Jobs are checked against `gozon.processes`, on the chart as `helm template` renders it.

A process added to the table and forgotten in the chart (or a port, a command, a probe path
that drifted) fails here; so does a Deployment the table does not know.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gozon.orders.settings import OrdersSettings
from gozon.payments.settings import PaymentsSettings
from gozon.processes import (
    LIVENESS_PATH,
    METRICS_PATH,
    MIGRATIONS,
    PROCESSES,
    READINESS_PATH,
    Process,
)
from scripts import chart_process_table

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gozon"
RELEASE = "shop"
FULLNAME = "shop-gozon"

Manifest = dict[str, Any]


def helm_binary() -> Path:
    cache = Path(os.environ.get("GOZON_TOOLS_CACHE", Path.home() / ".cache" / "gozon"))
    path = cache / "bin" / "helm"
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/k8s-tools (make test-chart does)")
    return path


def render(tmp_path: Path, *values_files: Path, sets: tuple[str, ...] = ()) -> list[Manifest]:
    """`helm template` of the chart, with Helm's homes in tmp_path (no user configuration)."""
    env = {
        **os.environ,
        **{f"HELM_{k}_HOME": str(tmp_path / k) for k in ("CACHE", "CONFIG", "DATA")},
    }
    args = [str(helm_binary()), "template", RELEASE, str(CHART), "--namespace", "shop"]
    for values in values_files:
        args += ["--values", str(values)]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def of_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    found: dict[str, Manifest] = {}
    for doc in manifests:
        if doc["kind"] == kind:
            name = doc["metadata"]["name"]
            assert name not in found, f"two {kind}s named {name}"
            found[name] = doc
    return found


def container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    result: Manifest = containers[0]
    return result


def values_files() -> Iterator[Path | None]:
    yield None
    yield from sorted((CHART / "ci").glob("*.yaml"))


@pytest.fixture(
    scope="module", params=list(values_files()), ids=lambda p: p.stem if p else "defaults"
)
def manifests(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[Manifest]:
    values: Path | None = request.param
    return render(tmp_path_factory.mktemp("helm"), *([values] if values else []))


def test_exactly_one_deployment_per_process(manifests: list[Manifest]) -> None:
    deployments = of_kind(manifests, "Deployment")
    assert sorted(deployments) == sorted(f"{FULLNAME}-{p.name}" for p in PROCESSES)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_each_deployment_runs_its_process(manifests: list[Manifest], process: Process) -> None:
    deployment = of_kind(manifests, "Deployment")[f"{FULLNAME}-{process.name}"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == process.name
    main = container(deployment)
    assert " ".join([*main["command"], *main["args"]]) == process.command
    port_name = "http" if process.serves_api else "metrics"
    side = [] if process.default_side_port is None else [process.default_side_port]
    assert main["ports"] == [
        {"name": port_name, "containerPort": process.default_port, "protocol": "TCP"},
        *({"name": "metrics", "containerPort": port, "protocol": "TCP"} for port in side),
    ]
    assert main["livenessProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": port_name}
    # The gateway's readiness is its liveness: its /health/ready fails while either upstream
    # is down, which would take both services' routes out of its Service (docs/kubernetes.md).
    ready = LIVENESS_PATH if process.kind == "gateway" else READINESS_PATH
    assert main["readinessProbe"]["httpGet"] == {"path": ready, "port": port_name}


def test_the_settings_name_each_process_port(manifests: list[Manifest]) -> None:
    config = of_kind(manifests, "ConfigMap")[FULLNAME]["data"]
    for process in PROCESSES:
        for setting, port in process.ports.items():
            assert config[setting] == str(port), process.name


def test_every_process_is_scraped_on_its_metrics_port_and_only_from_monitoring(
    tmp_path: Path,
) -> None:
    """The gateway's public port and Service carry no /metrics: it is scraped on its side port,
    which, as every metrics port, only the monitoring namespace may reach."""
    manifests = render(
        tmp_path, sets=("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true")
    )
    scraped: dict[str, str] = {}
    monitors = [*of_kind(manifests, "ServiceMonitor").values()]
    monitors += [m for m in of_kind(manifests, "PodMonitor").values() if "jobLabel" in m["spec"]]
    for monitor in monitors:
        (expression,) = monitor["spec"]["selector"]["matchExpressions"]
        endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        (endpoint,) = endpoints
        assert endpoint["path"] == METRICS_PATH
        for name in expression["values"]:
            assert name not in scraped, f"{name} scraped twice"
            scraped[name] = endpoint["port"]
    # the port serving /metrics: the APIs' own (reached only in-cluster), everyone else's side port
    expected = {p.name: "http" if p.kind == "api" else "metrics" for p in PROCESSES}
    assert scraped == expected
    gateway_service = of_kind(manifests, "Service")[f"{FULLNAME}-gateway"]
    assert [p["targetPort"] for p in gateway_service["spec"]["ports"]] == ["http"]
    policies = of_kind(manifests, "NetworkPolicy")
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    for process in PROCESSES:
        port = {"port": expected[process.name], "protocol": "TCP"}
        ingress = policies[f"{FULLNAME}-{process.name}"]["spec"]["ingress"]
        reaching = [rule.get("from") for rule in ingress if port in rule["ports"]]
        if process.kind == "api":  # the gateway calls the API on that port too
            reaching = [peers for peers in reaching if peers and "namespaceSelector" in peers[0]]
        assert reaching == [[monitoring]], process.name


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_a_service_process_gets_its_own_database_url_only(
    manifests: list[Manifest], process: Process
) -> None:
    env = {
        e["name"]
        for e in container(of_kind(manifests, "Deployment")[f"{FULLNAME}-{process.name}"])["env"]
    }
    urls = {name for name in env if name.endswith("_DATABASE_URL")}
    expected = {f"GOZON_{process.service.upper()}_DATABASE_URL"} if process.service else set()
    assert urls == expected
    # ... under the name the settings read it by.
    fields = {**OrdersSettings.model_fields, **PaymentsSettings.model_fields}
    assert all(name.removeprefix("GOZON_").lower() in fields for name in urls)


def test_services_exactly_for_the_http_processes(manifests: list[Manifest]) -> None:
    services = {
        name: svc
        for name, svc in of_kind(manifests, "Service").items()
        if not name.endswith("-db")  # the bundled databases' Services
    }
    http = [p for p in PROCESSES if p.serves_api]
    assert sorted(services) == sorted(f"{FULLNAME}-{p.name}" for p in http)
    for process in http:
        ports = services[f"{FULLNAME}-{process.name}"]["spec"]["ports"]
        assert [(p["port"], p["targetPort"]) for p in ports] == [(process.default_port, "http")]


def test_the_gateway_reaches_the_apis_at_their_services(manifests: list[Manifest]) -> None:
    config = of_kind(manifests, "ConfigMap")[FULLNAME]["data"]
    for process in PROCESSES:
        if process.kind == "api":
            setting = f"GOZON_GATEWAY_{process.service.upper()}_URL"  # type: ignore[union-attr]
            assert config[setting] == f"http://{FULLNAME}-{process.name}:{process.default_port}"


@pytest.mark.parametrize("mode", ["bundled", "external"])
def test_one_job_per_migration(tmp_path: Path, mode: str) -> None:
    sets: tuple[str, ...] = ("postgresql.mode=" + mode,)
    if mode == "external":
        sets += tuple(
            f"postgresql.external.{service}.{key}=x"
            for service in ("orders", "payments")
            for key in ("host", "password")
        )
    jobs = of_kind(render(tmp_path, sets=sets), "Job").values()
    commands = sorted(
        " ".join([*container(job)["command"], *container(job)["args"]]) for job in jobs
    )
    assert commands == sorted(m.command for m in MIGRATIONS)


def test_the_chart_reads_the_process_table_generated_from_python() -> None:
    assert chart_process_table.TABLE.read_text() == chart_process_table.render(), (
        f"{chart_process_table.TABLE} is stale: run python -m scripts.chart_process_table"
    )


def test_no_template_writes_a_process_port_itself() -> None:
    """Ports come from the table (gozon.processTable), never as numbers in a template."""
    ports = {port for p in PROCESSES for port in p.ports.values()}
    for path in sorted((CHART / "templates").rglob("*")):
        if path.is_file():
            text = path.read_text()
            written = sorted(port for port in ports if re.search(rf"(?<!\d){port}(?!\d)", text))
            assert not written, f"{path.relative_to(CHART)} writes {written}"


def test_the_values_list_every_process_and_no_other() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert sorted(values["processes"]) == sorted(p.name for p in PROCESSES)


def test_the_bundled_databases_urls_carry_their_own_passwords(tmp_path: Path) -> None:
    """The app's Secret and each database's Secret are drawn from one password per database."""
    secrets = of_kind(render(tmp_path), "Secret")
    urls = secrets[FULLNAME]["stringData"]
    for service, database in (("orders", "order_db"), ("payments", "account_db")):
        password = secrets[f"{FULLNAME}-{service}-db"]["stringData"]["password"]
        assert len(password) == 32
        assert urls[f"GOZON_{service.upper()}_DATABASE_URL"] == (
            f"postgresql+asyncpg://gozon:{password}@{FULLNAME}-{service}-db:5432/{database}"
        )


def test_the_config_checksum_holds_no_random_password(tmp_path: Path) -> None:
    """Two renders draw different passwords (no cluster to read them back from) but the pods'
    checksum/config is the same: an upgrade that keeps the passwords does not roll the pods."""

    def checksums() -> set[str]:
        return {
            d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            for d in of_kind(render(tmp_path), "Deployment").values()
        }

    first, second = checksums(), checksums()
    assert len(first) == 1
    assert first == second
    changed = {
        d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for d in of_kind(
            render(tmp_path, sets=("config.GOZON_LOG_LEVEL=DEBUG",)), "Deployment"
        ).values()
    }
    assert changed.isdisjoint(first)


def env_of(deployment: Manifest) -> dict[str, Manifest]:
    return {item["name"]: item for item in container(deployment).get("env", [])}


def test_header_identity_by_default_and_only_the_gateway_gets_it(tmp_path: Path) -> None:
    deployments = of_kind(render(tmp_path), "Deployment")
    for name, deployment in deployments.items():
        env = env_of(deployment)
        if name == f"{FULLNAME}-gateway":
            assert env["GOZON_GATEWAY_IDENTITY"]["value"] == "header"
            assert "GOZON_GATEWAY_JWT_SECRET" not in env
        else:
            assert "GOZON_GATEWAY_IDENTITY" not in env, name


@pytest.mark.parametrize("source", ["secretName", "jwksConfigMap"])
def test_jwt_identity_takes_its_key_from_a_secret_or_a_mounted_jwks(
    tmp_path: Path, source: str
) -> None:
    sets = (
        "identity.mode=jwt",
        "identity.jwt.audience=shop",
        "identity.jwt.issuer=https://id.example",
        f"identity.jwt.{source}=shop-jwt",
    )
    gateway = of_kind(render(tmp_path, sets=sets), "Deployment")[f"{FULLNAME}-gateway"]
    env = env_of(gateway)
    assert env["GOZON_GATEWAY_IDENTITY"]["value"] == "jwt"
    assert env["GOZON_GATEWAY_JWT_AUDIENCE"]["value"] == "shop"
    assert env["GOZON_GATEWAY_JWT_ISSUER"]["value"] == "https://id.example"
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    if source == "secretName":
        assert env["GOZON_GATEWAY_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {
            "name": "shop-jwt",
            "key": "GOZON_GATEWAY_JWT_SECRET",
        }
        assert "jwks" not in volumes
    else:
        assert env["GOZON_GATEWAY_JWT_JWKS_FILE"]["value"] == "/etc/gozon/jwks/jwks.json"
        assert volumes["jwks"]["configMap"]["name"] == "shop-jwt"
        mounts = {m["name"]: m for m in container(gateway)["volumeMounts"]}
        assert mounts["jwks"]["mountPath"] == "/etc/gozon/jwks"
        assert "GOZON_GATEWAY_JWT_SECRET" not in env


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_a_worker_counts_its_crashes_on_a_volume_that_outlives_its_container(
    manifests: list[Manifest], process: Process
) -> None:
    """GOZON_CRASH_STATE_DIR on an emptyDir of the pod: a restarted container reads the
    crashes before it (gozon_process_crashes_in_a_row, GozonProcessCrashLooping)."""
    deployment = of_kind(manifests, "Deployment")[f"{FULLNAME}-{process.name}"]
    env = env_of(deployment)
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    if process.kind not in ("relay", "consumer"):  # only the workers keep crash state
        assert "GOZON_CRASH_STATE_DIR" not in env
        assert "crash-state" not in mounts
        assert "crash-state" not in volumes
        return
    assert "crash_state_dir" in OrdersSettings.model_fields  # the name the settings read
    directory = env["GOZON_CRASH_STATE_DIR"]["value"]
    assert mounts["crash-state"]["mountPath"] == directory
    assert not mounts["crash-state"].get("readOnly", False)
    assert set(volumes["crash-state"]) == {"name", "emptyDir"}
