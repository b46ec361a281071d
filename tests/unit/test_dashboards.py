"""The Grafana dashboards and Prometheus alert rules in charts/gozon/dashboards/.

Every dashboard is valid JSON that Grafana can provision (stable uid, the `datasource`
variable on every panel), every alert rule is complete, and every metric that a dashboard or
a rule names is one the code defines: a typo, or a metric renamed in the code but not here,
fails. The live counterpart (the names appear in real scrapes) is tests/e2e/test_metrics_live.py.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "gozon" / "dashboards"
ALERTS = DASHBOARDS / "alerts.yaml"

# Grafana links, bookmarks and provisioning updates follow the uid: change one only on purpose.
UIDS = {
    "outbox.json": "gozon-outbox",
    "payments.json": "gozon-payments",
    "http.json": "gozon-http",
    "consumers.json": "gozon-consumers",
    "end-to-end.json": "gozon-end-to-end",
    "kafka.json": "gozon-kafka",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat"}
UNITS = {"s", "reqps", "ops", "percentunit", "short", "Bps"}
SEVERITIES = {"warning", "critical"}

# The modules that define the `gozon_` metrics; importing one registers its metrics.
METRIC_MODULES = (
    "gozon.core.metrics",
    "gozon.core.crashloop",
    "gozon.messaging.metrics",
    "gozon.orders.consumer",
    "gozon.payments.metrics",
    "gozon.gateway.proxy",
)
METRIC_NAME = re.compile(r"\bgozon_[a-z0-9_]+")
# The Strimzi brokers' dashboard: the series of the JMX exporter's rules (kafka.strimzi.metrics).
BROKER_DASHBOARDS = {"kafka.json"}
BROKER_METRIC_NAME = re.compile(r"\bkafka_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS.glob("*.json"))
    }


def load_alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for board in load_dashboards().values()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def metric_names_used() -> set[str]:
    """Every `gozon_…` series name in a dashboard query or an alert expression."""
    exprs = dashboard_exprs() + [rule["expr"] for rule in load_alert_rules()]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def family_of(name: str, types: Mapping[str, str]) -> str | None:
    """The metric family a series name belongs to, or None when no family has it.

    `types` maps family names to their type as prometheus_client reports them (the registry's
    and its text parser's convention): a counter's family name lacks `_total`, a histogram's
    series add `_bucket`, `_sum` and `_count` to it.
    """
    if types.get(name) in {"gauge", "histogram", "summary", "untyped"}:
        return name
    base = name.removesuffix("_total")
    if name.endswith("_total") and types.get(base) == "counter":
        return base
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and types.get(base) in {"histogram", "summary"}:
            if suffix == "_bucket" and types[base] != "histogram":
                return None
            return base
    return None


@cache
def defined_families() -> dict[str, str]:
    for module in METRIC_MODULES:
        importlib.import_module(module)
    return {family.name: family.type for family in REGISTRY.collect()}


# -- dashboards


def test_every_dashboard_is_one_of_the_known_files_with_its_stable_uid() -> None:
    boards = load_dashboards()
    assert {name: board.get("uid") for name, board in boards.items()} == UIDS


@pytest.mark.parametrize("filename", sorted(UIDS))
def test_a_dashboard_has_the_fields_grafana_provisioning_needs(filename: str) -> None:
    board = load_dashboards()[filename]
    assert isinstance(board["title"], str)
    assert board["title"].startswith("Gozon / ")
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 36
    assert board["tags"] == ["gozon"]
    variables = board["templating"]["list"]
    datasource = [v for v in variables if v["name"] == "datasource"]
    assert len(datasource) == 1
    assert datasource[0]["type"] == "datasource"
    assert datasource[0]["query"] == "prometheus"
    assert board["panels"], "a dashboard without panels"


@pytest.mark.parametrize("filename", sorted(UIDS))
def test_every_panel_queries_prometheus_through_the_datasource_variable(filename: str) -> None:
    panels = load_dashboards()[filename]["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        where = f"{filename}: {panel['title']!r}"
        assert panel["type"] in PANEL_TYPES, where
        assert panel["datasource"] == DATASOURCE, where
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, where
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), where
        assert panel["targets"], where
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, where
            if filename in BROKER_DASHBOARDS:
                # the exporter's generic rules (kafka_$1_$2_$3) make most names: only the
                # family is checked here
                assert BROKER_METRIC_NAME.search(target["expr"]), f"{where}: no kafka_ metric"
            else:
                assert METRIC_NAME.search(target["expr"]), f"{where} queries no gozon_ metric"


def test_dashboard_titles_and_uids_are_unique() -> None:
    boards = load_dashboards().values()
    assert len({board["uid"] for board in boards}) == len(boards)
    assert len({board["title"] for board in boards}) == len(boards)


# -- alert rules


def test_every_alert_rule_is_complete() -> None:
    rules = load_alert_rules()
    assert rules
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        where = rule.get("alert", rule)
        assert re.fullmatch(r"Gozon[A-Za-z0-9]+", rule["alert"]), where
        assert isinstance(rule["expr"], str), where
        # a Gozon metric, or Prometheus's own `up` of a Gozon job (the target rules)
        assert METRIC_NAME.search(rule["expr"]) or "up{job=" in rule["expr"], where
        assert re.fullmatch(r"\d+[smh]", rule["for"]), where
        assert rule["labels"]["severity"] in SEVERITIES, where
        assert rule["annotations"]["summary"].strip(), where
        assert rule["annotations"]["description"].strip(), where


def test_the_alerts_the_issue_asks_for_are_there() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in load_alert_rules()}
    assert "gozon_outbox_oldest_pending_age_seconds" in exprs["GozonOutboxLagHigh"]
    assert "> 60" in exprs["GozonOutboxLagHigh"]
    assert 'outcome="dead_lettered"' in exprs["GozonMessageDeadLettered"]
    assert "deriv(gozon_consumer_lag_messages" in exprs["GozonConsumerLagGrowing"]
    assert "gozon_orders_stuck" in exprs["GozonOrdersStuck"]


# -- metric names


@pytest.mark.parametrize("name", sorted(metric_names_used()))
def test_every_metric_named_in_a_dashboard_or_alert_is_defined_in_the_code(name: str) -> None:
    types = defined_families()
    assert family_of(name, types) is not None, (
        f"{name} is not a series of any metric defined in {', '.join(METRIC_MODULES)}"
    )


def test_the_metric_name_check_sees_counters_histograms_and_typos() -> None:
    types = {"gozon_a": "counter", "gozon_b": "histogram", "gozon_c": "gauge"}
    assert family_of("gozon_a_total", types) == "gozon_a"
    assert family_of("gozon_a", types) is None  # a counter's series ends in _total
    assert family_of("gozon_b_bucket", types) == "gozon_b"
    assert family_of("gozon_b_sum", types) == "gozon_b"
    assert family_of("gozon_b_count", types) == "gozon_b"
    assert family_of("gozon_c", types) == "gozon_c"
    assert family_of("gozon_c_total", types) is None
    assert family_of("gozon_d", types) is None
