"""Every hand-written list of the platform's processes and services agrees with the process
table (services/gozon/processes.py), so that a process or a service cannot be half-added.

Pure: the chart's and docker-compose's files are read as text, nothing is rendered or run.
The rendered chart is checked by tests/charts (`make test-chart`), docker-compose's services
one by one by tests/unit/test_compose.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from devstack import COMPOSE_DATABASES, COMPOSE_SERVICES
from gozon.processes import MIGRATIONS, PROCESSES, SERVICES
from scripts import chart_process_table

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gozon"
VALUES: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

PROCESS_NAMES = {p.name for p in PROCESSES}
SERVICE_NAMES = {s.name for s in SERVICES}
# What each kind of process can be tuned by in values.yaml: a relay is never autoscaled
# (its replicas share the outbox, and one keeps up), the others are.
TUNABLES = {
    "gateway": {"replicas", "resources", "autoscaling", "pdb"},
    "api": {"replicas", "resources", "autoscaling", "pdb"},
    "consumer": {"replicas", "resources", "autoscaling", "pdb"},
    "relay": {"replicas", "resources", "pdb"},
}


def test_the_charts_copy_of_the_table_is_current() -> None:
    assert chart_process_table.TABLE.read_text() == chart_process_table.render(), (
        "charts/gozon/files/processes.yaml is stale: run python -m scripts.chart_process_table"
    )


def test_the_chart_values_tune_exactly_the_table_processes_by_their_kind() -> None:
    values = VALUES["processes"]
    assert sorted(values) == sorted(PROCESS_NAMES)
    for process in PROCESSES:
        assert set(values[process.name]) == TUNABLES[process.kind], process.name


def test_the_values_schema_requires_exactly_the_table_processes_and_their_tunables() -> None:
    schema = SCHEMA["properties"]["processes"]
    assert schema["additionalProperties"] is False
    assert sorted(schema["properties"]) == sorted(PROCESS_NAMES)
    assert sorted(schema["required"]) == sorted(PROCESS_NAMES)
    for process in PROCESSES:
        entry = schema["properties"][process.name]
        assert set(entry["properties"]) == TUNABLES[process.kind], process.name
        assert set(entry["required"]) == TUNABLES[process.kind], process.name


def test_the_chart_has_an_external_database_for_every_service() -> None:
    external = VALUES["postgresql"]["external"]
    assert {name: db["database"] for name, db in external.items()} == {
        s.name: s.database for s in SERVICES
    }
    schema = SCHEMA["properties"]["postgresql"]["properties"]["external"]
    assert sorted(schema["properties"]) == sorted(schema["required"]) == sorted(SERVICE_NAMES)


def _template_lists() -> list[tuple[str, list[str]]]:
    """Every literal list in the chart's templates: `[a, b]` and `list "a" "b"`."""
    found = []
    for path in sorted((CHART / "templates").rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        where = str(path.relative_to(CHART))
        for items in re.findall(r"\[([\w\-, ]+)\]", text):
            found.append((where, [item.strip() for item in items.split(",")]))
        for items in re.findall(r"\blist((?: +\"[^\"]*\")+)", text):
            found.append((where, re.findall(r"\"([^\"]*)\"", items)))
    return found


def test_the_templates_lists_of_processes_name_every_process_of_the_kinds_they_name() -> None:
    """A list naming an orders relay names every relay: a new service's relay cannot be left
    out of the Kafka users, the PodMonitor or the NetworkPolicies."""
    # ([gateway, api] is a list of kinds, and the gateway is one of each)
    named = PROCESS_NAMES - set(TUNABLES)
    lists = [(where, items) for where, items in _template_lists() if named & set(items)]
    assert len(lists) >= 3, lists  # the PodMonitor's, the ServiceMonitor's, Strimzi's at least
    for where, items in lists:
        assert set(items) <= PROCESS_NAMES, (where, items)
        kinds = {p.kind for p in PROCESSES if p.name in items}
        assert sorted(items) == sorted(p.name for p in PROCESSES if p.kind in kinds), where


def test_the_templates_lists_of_services_name_every_service() -> None:
    lists = [(where, items) for where, items in _template_lists() if SERVICE_NAMES & set(items)]
    assert len(lists) >= 5, lists  # the databases, their Secrets, migrations, policies, backup
    for where, items in lists:
        assert sorted(items) == sorted(SERVICE_NAMES), (where, items)


def test_docker_compose_runs_exactly_the_table_and_a_database_per_service() -> None:
    assert set(COMPOSE_SERVICES) == PROCESS_NAMES | {m.name for m in MIGRATIONS}
    image = "${GOZON_IMAGE:-gozon:latest}"
    gozon = {name for name, service in COMPOSE["services"].items() if service.get("image") == image}
    assert gozon == set(COMPOSE_SERVICES.values())
    assert set(COMPOSE_DATABASES) == SERVICE_NAMES
    for service in SERVICES:
        database = COMPOSE["services"][COMPOSE_DATABASES[service.name]]
        assert database["environment"]["POSTGRES_DB"] == service.database, service.name
