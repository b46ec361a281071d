"""values.schema.json rejects misspelt and mistyped values; every value is documented.

A table of bad values files, each of which `helm lint --strict` and `helm template` must refuse
with the path of the bad value in the message, next to the same commands passing on the good
values files of `charts/gozon/ci/` (so a helm that fails on everything cannot pass this). Then
the agreement checks: the settings the schema accepts in `config` plus the ones the chart sets
itself are exactly the settings the code reads; every key of values.yaml has its comment; the
values table in docs/kubernetes.md is the generated one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from gozon.gateway.settings import GatewaySettings
from gozon.orders.settings import OrdersSettings
from gozon.payments.settings import PaymentsSettings
from scripts import chart_values_doc

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gozon"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# Settings the chart derives from other values (process table, Services, kafka.*, postgresql.*).
CHART_SETS = {
    "GOZON_GATEWAY_HOST",
    "GOZON_GATEWAY_PORT",
    "GOZON_GATEWAY_METRICS_PORT",
    "GOZON_GATEWAY_ORDERS_URL",
    "GOZON_GATEWAY_PAYMENTS_URL",
    "GOZON_ORDERS_API_HOST",
    "GOZON_ORDERS_API_PORT",
    "GOZON_ORDERS_RELAY_METRICS_PORT",
    "GOZON_ORDERS_CONSUMER_METRICS_PORT",
    "GOZON_PAYMENTS_API_HOST",
    "GOZON_PAYMENTS_API_PORT",
    "GOZON_PAYMENTS_RELAY_METRICS_PORT",
    "GOZON_PAYMENTS_CONSUMER_METRICS_PORT",
    "GOZON_KAFKA_BOOTSTRAP_SERVERS",
    "GOZON_CRASH_STATE_DIR",  # the workers', on an emptyDir of their pod
    "GOZON_KAFKA_TOPIC_PARTITIONS",
    "GOZON_KAFKA_REPLICATION_FACTOR",
    # from kafka.strimzi / kafka.external (gozon.kafkaAuth), on the relays and consumers
    "GOZON_KAFKA_CREATE_TOPICS",
    "GOZON_KAFKA_SECURITY_PROTOCOL",
    "GOZON_KAFKA_SASL_MECHANISM",
    "GOZON_KAFKA_SASL_USERNAME",
    "GOZON_KAFKA_SASL_PASSWORD_FILE",
    "GOZON_KAFKA_SASL_PASSWORD",
    "GOZON_KAFKA_SSL_CA_FILE",
    "GOZON_ORDERS_DATABASE_URL",
    "GOZON_PAYMENTS_DATABASE_URL",
    # from `identity` (gozon.identityEnv), on the gateway only
    "GOZON_GATEWAY_IDENTITY",
    "GOZON_GATEWAY_JWT_AUDIENCE",
    "GOZON_GATEWAY_JWT_ISSUER",
    "GOZON_GATEWAY_JWT_LEEWAY_S",
    "GOZON_GATEWAY_JWT_MAX_LIFETIME_S",
    "GOZON_GATEWAY_JWT_SECRET",
    "GOZON_GATEWAY_JWT_JWKS_FILE",
}

# (id, values, what the error must say): each refused by the schema before anything renders.
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("misspelt top-level key", {"replicaCount": 3}, "additional properties 'replicaCount'"),
    (
        "misspelt process",
        {"processes": {"gatway": {"replicas": 2}}},
        "additional properties 'gatway'",
    ),
    (
        "process removed",
        {"processes": {"orders-relay": None}},
        "missing property 'orders-relay'",
    ),
    (
        "replicas as a word",
        {"processes": {"gateway": {"replicas": "two"}}},
        "at '/processes/gateway/replicas'",
    ),
    (
        "negative replicas",
        {"processes": {"orders-relay": {"replicas": -1}}},
        "at '/processes/orders-relay/replicas'",
    ),
    (
        "autoscaling a relay",
        {"processes": {"orders-relay": {"autoscaling": {"enabled": True}}}},
        "additional properties 'autoscaling'",
    ),
    (
        "CPU target over 100 %",
        {
            "processes": {
                "orders-api": {
                    "autoscaling": {
                        "enabled": True,
                        "minReplicas": 1,
                        "maxReplicas": 2,
                        "targetCPUUtilizationPercentage": 150,
                    }
                }
            }
        },
        "at '/processes/orders-api/autoscaling/targetCPUUtilizationPercentage'",
    ),
    (
        "misspelt resource",
        {"processes": {"payments-api": {"resources": {"requests": {"cpus": "1"}}}}},
        "additional properties 'cpus'",
    ),
    ("image tag latest", {"image": {"tag": "latest"}}, "at '/image/tag'"),
    ("image tag as a number", {"image": {"tag": 1.0}}, "at '/image/tag'"),
    ("pull policy misspelt", {"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ("unknown setting", {"config": {"GOZON_LOG_LEVL": "INFO"}}, "'GOZON_LOG_LEVL'"),
    (
        "a setting the chart owns",
        {"config": {"GOZON_ORDERS_API_PORT": 9000}},
        "'GOZON_ORDERS_API_PORT'",
    ),
    (
        "log level not a level",
        {"config": {"GOZON_LOG_LEVEL": "VERBOSE"}},
        "at '/config/GOZON_LOG_LEVEL'",
    ),
    ("boolean as a word", {"config": {"GOZON_LOG_JSON": "yes"}}, "at '/config/GOZON_LOG_JSON'"),
    (
        "batch size out of range",
        {"config": {"GOZON_RELAY_BATCH_SIZE": 0}},
        "at '/config/GOZON_RELAY_BATCH_SIZE'",
    ),
    (
        "root user",
        {"common": {"podSecurityContext": {"runAsUser": 0}}},
        "at '/common/podSecurityContext/runAsUser'",
    ),
    (
        "privileged container asked for",
        {"common": {"securityContext": {"privileged": True}}},
        "additional properties 'securityContext'",
    ),
    ("kafka mode misspelt", {"kafka": {"mode": "kraft"}}, "at '/kafka/mode'"),
    (
        "external kafka without an address",
        {"kafka": {"mode": "external"}},
        "at '/kafka/external/bootstrapServers'",
    ),
    (
        "bootstrap address without a port",
        {"kafka": {"mode": "external", "external": {"bootstrapServers": "kafka-0"}}},
        "at '/kafka/external/bootstrapServers'",
    ),
    ("zero partitions", {"kafka": {"topics": {"partitions": 0}}}, "at '/kafka/topics/partitions'"),
    (
        "a Kafka version Strimzi 1.2 does not run",
        {"kafka": {"strimzi": {"version": "4.1.0"}}},
        "at '/kafka/strimzi/version'",
    ),
    (
        "SASL with an external broker and no user",
        {
            "kafka": {
                "mode": "external",
                "external": {
                    "bootstrapServers": "b:9092",
                    "securityProtocol": "SASL_PLAINTEXT",
                    "passwordSecret": "kafka-password",
                },
            }
        },
        "at '/kafka/external/username'",
    ),
    (
        "SASL with an external broker and no password",
        {
            "kafka": {
                "mode": "external",
                "external": {
                    "bootstrapServers": "b:9092",
                    "securityProtocol": "SASL_SSL",
                    "username": "gozon",
                },
            }
        },
        "at '/kafka/external/passwordSecret'",
    ),
    (
        "retention as text",
        {"kafka": {"topics": {"retentionHours": "a week"}}},
        "at '/kafka/topics/retentionHours'",
    ),
    ("postgresql mode misspelt", {"postgresql": {"mode": "internal"}}, "at '/postgresql/mode'"),
    (
        "external postgresql without a host",
        {"postgresql": {"mode": "external"}},
        "at '/postgresql/external/orders/host'",
    ),
    (
        "database port as text",
        {"postgresql": {"external": {"payments": {"port": "5432x"}}}},
        "at '/postgresql/external/payments/port'",
    ),
    (
        "monitoring switch as a word",
        {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        "at '/metrics/serviceMonitor/enabled'",
    ),
    ("identity mode misspelt", {"identity": {"mode": "oauth"}}, "at '/identity/mode'"),
    ("service type misspelt", {"service": {"type": "Ingress"}}, "at '/service/type'"),
    (
        "network peer misspelt",
        {"networkPolicy": {"gatewayFrom": [{"namespace": "ingress"}]}},
        "additional properties 'namespace'",
    ),
    (
        "OTLP endpoint without scheme",
        {"otel": {"endpoint": "collector:4318"}},
        "at '/otel/endpoint'",
    ),
]

# Values the schema cannot judge alone; the templates refuse them with a message that says why.
BAD_COMBINATIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "more copies than brokers",
        {"kafka": {"strimzi": {"replicas": 1}}},
        "kafka.topics.replicationFactor (3) cannot exceed kafka.strimzi.replicas (1)",
    ),
    (
        "existingSecret with bundled databases",
        {"existingSecret": "mine"},
        "existingSecret is for postgresql.mode external",
    ),
    (
        "external database without a password or existingSecret",
        {
            "postgresql": {
                "mode": "external",
                "external": {"orders": {"host": "a"}, "payments": {"host": "b"}},
            }
        },
        "postgresql.external.orders.password is required",
    ),
    (
        "jwt identity without an issuer",
        {"identity": {"mode": "jwt", "jwt": {"audience": "shop", "secretName": "jwt"}}},
        "identity.mode jwt needs identity.jwt.audience and identity.jwt.issuer",
    ),
    (
        "jwt identity with both key sources",
        {
            "identity": {
                "mode": "jwt",
                "jwt": {
                    "audience": "shop",
                    "issuer": "https://id.example",
                    "secretName": "jwt",
                    "jwksConfigMap": "jwks",
                },
            }
        },
        "exactly one of identity.jwt.secretName and identity.jwt.jwksConfigMap",
    ),
]


def helm(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cache = Path(os.environ.get("GOZON_TOOLS_CACHE", Path.home() / ".cache" / "gozon"))
    binary = cache / "bin" / "helm"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run scripts/k8s-tools (make test-chart does)")
    env = {
        **os.environ,
        **{f"HELM_{k}_HOME": str(tmp_path / k) for k in ("CACHE", "CONFIG", "DATA")},
    }
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, env=env, check=False, timeout=300
    )


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("values_path", sorted((CHART / "ci").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_good_values_files_pass(tmp_path: Path, values_path: Path) -> None:
    for command in ("lint", "template"):
        args = ["--strict"] if command == "lint" else ["gozon"]
        done = helm(tmp_path, command, *args, str(CHART), "--values", str(values_path))
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("values", "message"), [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES]
)
def test_the_schema_refuses(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    path = values_file(tmp_path, values)
    lint = helm(tmp_path, "lint", "--strict", str(CHART), "--values", str(path))
    assert lint.returncode != 0
    assert message in lint.stdout + lint.stderr
    template = helm(tmp_path, "template", "gozon", str(CHART), "--values", str(path))
    assert template.returncode != 0
    assert "values don't meet the specifications of the schema" in template.stderr
    assert message in template.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [case[1:] for case in BAD_COMBINATIONS],
    ids=[case[0] for case in BAD_COMBINATIONS],
)
def test_the_templates_refuse(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    path = values_file(tmp_path, values)
    template = helm(tmp_path, "template", "gozon", str(CHART), "--values", str(path))
    assert template.returncode != 0
    assert message in template.stderr


def _setting_names(*classes: type[BaseSettings]) -> set[str]:
    names = set()
    for settings in classes:
        prefix = str(settings.model_config.get("env_prefix", ""))
        names |= {f"{prefix}{field}".upper() for field in settings.model_fields}
    return names


def test_config_accepts_exactly_the_settings_the_chart_does_not_set() -> None:
    accepted = set(SCHEMA["properties"]["config"]["properties"])
    code = _setting_names(GatewaySettings, OrdersSettings, PaymentsSettings)
    assert not accepted & CHART_SETS, "the chart sets these itself"
    missing = sorted(code - accepted - CHART_SETS)
    assert not missing, (
        f"settings the chart cannot pass: {missing}. Add each to values.schema.json's "
        "`config` (typed like its pydantic field), or, if the chart derives it or it is a "
        "secret, set it in the templates and list it in CHART_SETS"
    )
    unknown = sorted(accepted - code)
    assert not unknown, f"values.schema.json's `config` accepts names no code reads: {unknown}"


@pytest.mark.parametrize(
    "values_path",
    [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))],
    ids=lambda p: p.stem,
)
def test_the_config_values_are_settings_the_processes_accept(
    monkeypatch: pytest.MonkeyPatch, values_path: Path
) -> None:
    """The ConfigMap's `config` part, read from the environment as the processes read it."""
    config = (yaml.safe_load(values_path.read_text()) or {}).get("config", {})
    for name, value in config.items():
        monkeypatch.setenv(name, str(value).lower() if isinstance(value, bool) else str(value))
    monkeypatch.setenv("GOZON_ORDERS_DATABASE_URL", "postgresql+asyncpg://u:s3cret@db/order_db")
    monkeypatch.setenv("GOZON_PAYMENTS_DATABASE_URL", "postgresql+asyncpg://u:s3cret@db/account_db")
    GatewaySettings()
    OrdersSettings()
    PaymentsSettings()


def test_every_values_key_is_documented_and_the_docs_table_is_current() -> None:
    rows = chart_values_doc.rows(chart_values_doc.VALUES.read_text())
    assert {".".join(row.path) for row in rows} >= {"processes.gateway.replicas", "kafka.mode"}
    doc = chart_values_doc.DOC.read_text()
    assert chart_values_doc.with_table(doc, chart_values_doc.VALUES.read_text()) == doc, (
        "docs/kubernetes.md's values table is stale: run python -m scripts.chart_values_doc"
    )


def test_the_default_image_tag_is_the_package_version() -> None:
    """image.tag defaults to appVersion: the tag `make image` gives the image it builds."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_every_helper_is_namespaced_and_says_how_to_call_it() -> None:
    """The shared helpers live in templates/_<topic>.tpl; each is `gozon.`-named, once, with its
    own comment and usage line."""
    names: list[str] = []
    for path in sorted((CHART / "templates").glob("_*.tpl")):
        parts = re.split(r"\{\{-? define ", path.read_text())
        assert len(parts) > 1, f"{path.name}: no helper"
        for before, block in itertools.pairwise(parts):
            name = block.split('"')[1]
            names.append(name)
            assert name.startswith("gozon."), name
            comment = before.rsplit("{{/*", 1)[-1]
            assert comment.lstrip().startswith(f"{name} -- "), f"{name}: no comment of its own"
            assert "Usage: " in comment, f"{name}: no usage line"
            usage = comment.split("Usage:")[1]
            assert name in usage, f"{name}: the usage line calls something else"
    assert len(names) > 30
    assert len(names) == len(set(names)), "a helper defined twice"


def test_an_undocumented_key_is_named() -> None:
    text = (
        "# image -- the image.\n"
        "image:\n"
        "  # repository -- its name.\n"
        "  repository: gozon\n"
        "  tag: x\n"
    )
    with pytest.raises(chart_values_doc.Undocumented, match=r"image.tag needs a comment"):
        chart_values_doc.rows(text)
