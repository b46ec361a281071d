"""The alert rules' unit tests (tests/prometheus/alerts.test.yaml) pass under Debian's
`promtool`, and they test every rule both firing and silent; the target rules name every
process of the process table.
"""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from devstack import prometheus_tool
from gozon.processes import PROCESSES
from tests.unit.test_dashboards import ALERTS, load_alert_rules

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts.test.yaml"


def rule_tests() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    return document


def test_the_rule_file_is_valid_for_promtool() -> None:
    done = subprocess.run(
        [str(prometheus_tool()), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    done = subprocess.run(
        [str(prometheus_tool()), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_unit_tests_load_the_shipped_rule_file() -> None:
    files = [(RULE_TESTS.parent / f).resolve() for f in rule_tests()["rule_files"]]
    assert files == [ALERTS.resolve()]


def test_every_rule_is_tested_firing_and_silent() -> None:
    outcomes: dict[str, set[bool]] = defaultdict(set)
    for case in rule_tests()["tests"]:
        for check in case.get("alert_rule_test", []):
            outcomes[check["alertname"]].add(bool(check.get("exp_alerts")))
    untested = {
        rule["alert"]: sorted(outcomes.get(rule["alert"], set()))
        for rule in load_alert_rules()
        if outcomes.get(rule["alert"]) != {True, False}
    }
    assert not untested, f"rules without a firing and a silent unit test: {untested}"


def test_a_target_rule_watches_every_process() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in load_alert_rules()}
    wanted = sorted(p.name for p in PROCESSES)
    down = re.search(r'up\{job=~"([^"]+)"\}', rules["GozonTargetDown"])
    assert down is not None
    assert sorted(down.group(1).split("|")) == wanted
    assert sorted(re.findall(r'absent\(up\{job="([^"]+)"\}\)', rules["GozonTargetMissing"])) == (
        wanted
    )
