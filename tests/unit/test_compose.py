"""docker-compose.yml, its Prometheus and Grafana files and the image agree with the process
table (services/gozon/processes.py) and with each other. `make test-compose` runs the stack
for real; these checks need no Docker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import COMPOSE_DATABASES, COMPOSE_SERVICES
from gozon.processes import MIGRATIONS, PROCESSES, READINESS_PATH, Migration, Process

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
GOZON_IMAGE = "${GOZON_IMAGE:-gozon:latest}"
DATABASES = {"orders": ("db_order", "order_db"), "payments": ("db_account", "account_db")}


def env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_the_gozon_services_are_exactly_the_processes_and_the_migrations() -> None:
    gozon = {name for name, service in SERVICES.items() if service.get("image") == GOZON_IMAGE}
    table = [p.name for p in PROCESSES] + [m.name for m in MIGRATIONS]
    assert set(COMPOSE_SERVICES) == set(table)
    assert gozon == {COMPOSE_SERVICES[name] for name in table}


def test_the_services_carry_the_spec_readme_names() -> None:
    """The spec's README runs `docker-compose exec db_order psql …`, `exec db_account psql …`,
    `logs order-service`, `logs payment-service` and `exec kafka kafka-topics …`."""
    assert {"db_order", "db_account", "kafka", "order-service", "payment-service"} <= set(SERVICES)
    assert {service: host for service, (host, _) in DATABASES.items()} == COMPOSE_DATABASES
    assert COMPOSE_SERVICES["orders-api"] == "order-service"
    assert COMPOSE_SERVICES["payments-api"] == "payment-service"


def test_the_kafka_container_has_the_spec_readme_tools_and_listener() -> None:
    """`kafka-topics --list --bootstrap-server localhost:29092` and `kafka-console-consumer`
    inside the kafka container: wrappers of Kafka's own scripts on the PATH, and a listener on
    port 29092 of every interface (localhost included)."""
    kafka = SERVICES["kafka"]
    for tool in ("kafka-topics", "kafka-console-consumer"):
        assert mounted("kafka", f"./docker/kafka/{tool}") == f"/usr/local/bin/{tool}"
        script = ROOT / "docker" / "kafka" / tool
        assert script.stat().st_mode & 0o111, f"{tool} is not executable"
        assert f"exec /opt/kafka/bin/{tool}.sh" in script.read_text()
        # the offline stand-in has the script the wrapper runs
        assert (ROOT / "docker" / "offline" / "kafka" / "bin" / f"{tool}.sh").exists()
    assert "INTERNAL://:29092" in env(kafka)["KAFKA_LISTENERS"]


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_each_process_runs_its_command_waits_for_its_migration_and_is_probed_ready(
    process: Process,
) -> None:
    service = SERVICES[COMPOSE_SERVICES[process.name]]
    assert service["command"] == list(process.args)
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"]["test"][-1] == (
        f"http://127.0.0.1:{process.default_port}{READINESS_PATH}"
    )
    depends = service["depends_on"]
    if process.service is not None:
        migration = next(m for m in MIGRATIONS if m.service == process.service)
        assert depends[COMPOSE_SERVICES[migration.name]] == {
            "condition": "service_completed_successfully"
        }
    if process.kind in ("relay", "consumer"):
        assert depends["kafka"] == {"condition": "service_started"}
    if process.kind == "gateway":
        assert depends == {
            COMPOSE_SERVICES[p.name]: {"condition": "service_started"}
            for p in PROCESSES
            if p.kind == "api"
        }
    # the container listens on the table's ports; only the gateway's API port is published
    # beyond loopback (its metrics port is not)
    published, *side = service["ports"]
    assert published.endswith(f":{process.default_port}")
    assert published.startswith("127.0.0.1:") != (process.kind == "gateway")
    expected_side = [] if process.default_side_port is None else [process.default_side_port]
    assert [int(port.rpartition(":")[2]) for port in side] == expected_side
    assert all(port.startswith("127.0.0.1:") for port in side)


@pytest.mark.parametrize("migration", MIGRATIONS, ids=lambda m: m.name)
def test_each_migration_is_one_shot_after_its_database(migration: Migration) -> None:
    service = SERVICES[COMPOSE_SERVICES[migration.name]]
    assert service["command"] == list(migration.args)
    assert service["restart"] == "no"
    database, _ = DATABASES[migration.service]
    assert service["depends_on"] == {database: {"condition": "service_healthy"}}


def test_the_processes_reach_the_spec_databases_and_the_internal_listener() -> None:
    settings = env(SERVICES["gateway"])
    for service, (host, name) in DATABASES.items():
        url = settings[f"GOZON_{service.upper()}_DATABASE_URL"]
        assert re.fullmatch(rf"postgresql\+asyncpg://postgres:.+@{host}:5432/{name}", url)
        assert env(SERVICES[host])["POSTGRES_DB"] == name
    assert settings["GOZON_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092"
    assert "INTERNAL://kafka:29092" in env(SERVICES["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert settings["GOZON_GATEWAY_ORDERS_URL"] == "http://order-service:8081"
    assert settings["GOZON_GATEWAY_PAYMENTS_URL"] == "http://payment-service:8082"


def test_the_spec_ports_are_published() -> None:
    assert SERVICES["db_order"]["ports"] == ["127.0.0.1:${GOZON_ORDERS_DB_PUBLISH:-5433}:5432"]
    assert SERVICES["db_account"]["ports"] == ["127.0.0.1:${GOZON_PAYMENTS_DB_PUBLISH:-5432}:5432"]
    assert SERVICES["gateway"]["ports"][0] == "${GOZON_GATEWAY_PUBLISH:-8080}:8080"


def test_every_image_is_a_variable_with_a_public_default() -> None:
    for name, service in SERVICES.items():
        image = service["image"]
        match = re.fullmatch(r"\$\{(GOZON_[A-Z_]*IMAGE):-([a-z0-9./_-]+:[\w.-]+)\}", image)
        assert match, f"{name}: {image}"
        assert match.group(2) != "latest" or name in set(COMPOSE_SERVICES.values())


def test_traces_are_behind_the_observability_profile_and_nothing_else_is() -> None:
    profiled = {name: s["profiles"] for name, s in SERVICES.items() if "profiles" in s}
    assert profiled == {"otel-collector": ["observability"], "jaeger": ["observability"]}
    assert env(SERVICES["gateway"])["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${GOZON_OTLP_ENDPOINT:-}"
    collector = yaml.safe_load((ROOT / "docker" / "otel-collector.yaml").read_text())
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"


def test_every_volume_is_named_so_down_v_removes_it() -> None:
    declared = set(COMPOSE["volumes"])
    used = set()
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("./"):
                used.add(source)
            else:
                assert volume.endswith(":ro"), f"bind mounts are read-only: {volume}"
                assert (ROOT / source).exists(), volume
    assert used == declared


def mounted(service: str, source: str) -> str:
    for volume in SERVICES[service]["volumes"]:
        if volume.split(":")[0] == source:
            target: str = volume.split(":")[1]
            return target
    raise AssertionError(f"{service} does not mount {source}")


def test_prometheus_scrapes_every_process_by_name_and_loads_the_shipped_rules() -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    jobs = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert {name: targets for name, targets in jobs.items() if name != "prometheus"} == {
        p.name: [f"{COMPOSE_SERVICES[p.name]}:{p.default_metrics_port}"] for p in PROCESSES
    }
    rules = mounted("prometheus", "./charts/gozon/dashboards/alerts.yaml")
    (pattern,) = config["rule_files"]
    assert Path(rules).match(pattern)
    assert mounted("prometheus", "./docker/prometheus/prometheus.yml") == (
        "/etc/prometheus/prometheus.yml"
    )


def test_grafana_provisions_the_mounted_dashboards_folder_and_prometheus() -> None:
    provisioning = ROOT / "docker" / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "gozon.yaml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == mounted("grafana", "./charts/gozon/dashboards")
    assert mounted("grafana", "./docker/grafana/provisioning") == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


def pins(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name → (version, hashes) of a hashed requirements file."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for block in re.split(r"\n(?=\S)", path.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            hashes = frozenset(re.findall(r"--hash=(sha256:[0-9a-f]+)", block))
            found[match.group(1).lower()] = (match.group(2), hashes)
    return found


@pytest.mark.parametrize("name", ["runtime.txt", "build.txt"])
def test_the_image_locks_are_hashed_and_agree_with_the_project_lock(name: str) -> None:
    lock = pins(ROOT / "requirements" / "lock.txt")
    image = pins(ROOT / "requirements" / name)
    assert image
    for package, (version, hashes) in image.items():
        assert hashes, f"{package} has no hash"
        if package in lock:
            assert lock[package] == (version, hashes), f"{package} differs from lock.txt"
    if name == "runtime.txt":
        assert set(image) <= set(lock)


def test_the_image_is_non_root_on_the_public_base_and_installs_only_the_hashed_lock() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert "--require-hashes" in dockerfile
    assert "-r /src/requirements/runtime.txt" in dockerfile
    assert "HEALTHCHECK" not in dockerfile
    assert 'ENTRYPOINT ["gozon"]' in dockerfile
    patterns = [
        line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] not in "#"
    ]
    assert patterns[0] == "*", "the build context is an allow-list"
    assert {"!services/", "!requirements/runtime.txt", "!docker/wheels/"} <= set(patterns)


def test_the_kafka_container_is_tuned_as_the_local_stack_broker() -> None:
    """A single-node development broker on both paths: the same settings as `make up`'s."""
    from devstack.kafka import DEV_BROKER_CONFIG, DEV_JVM_OPTIONS

    kafka = env(SERVICES["kafka"])
    for key, value in DEV_BROKER_CONFIG.items():
        assert kafka.get("KAFKA_" + key.upper().replace(".", "_")) == value, key
    assert kafka["KAFKA_JVM_PERFORMANCE_OPTS"].split() == list(DEV_JVM_OPTIONS)
