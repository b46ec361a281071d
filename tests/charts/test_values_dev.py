"""charts/gozon/values-dev.yaml, the laptop profile of the README's first run: one broker,
no autoscaling, and requests that fit a 4-CPU / 8 GiB minikube with room for the cluster's own
pods and the Strimzi operator. The budget is checked on the merged values (no tools) and on
what `helm template` renders (helm from the tools cache)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.charts.support import Helm

CHART = Path(__file__).resolve().parents[2] / "charts" / "gozon"
DEV = CHART / "values-dev.yaml"
CPU_BUDGET = 2.0  # of minikube's 4 CPUs; its system pods request ~0.85
MEMORY_BUDGET = 4 * 2**30  # of its 8 GiB


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value)
        else:
            out[key] = value
    return out


def cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory(quantity: str | int) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i)?", str(quantity)).groups()  # type: ignore[union-attr]
    return int(float(number) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit])


def values() -> dict[str, Any]:
    return merged(
        yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(DEV.read_text())
    )


def test_one_broker_and_one_pod_per_process() -> None:
    v = values()
    assert v["kafka"]["strimzi"]["replicas"] == 1
    assert v["kafka"]["topics"]["replicationFactor"] == 1
    assert v["kafka"]["topics"]["minInsyncReplicas"] == 1
    for name, process in v["processes"].items():
        assert process["replicas"] == 1, name
        assert not process.get("autoscaling", {}).get("enabled", False), name


def test_the_requests_fit_a_4_cpu_8_gib_minikube() -> None:
    v = values()
    pods = [(p["replicas"], p["resources"]["requests"]) for p in v["processes"].values()]
    pods += [(2, v["postgresql"]["bundled"]["resources"]["requests"])]
    pods += [(v["kafka"]["strimzi"]["replicas"], v["kafka"]["strimzi"]["resources"]["requests"])]
    assert sum(n * cpu(r["cpu"]) for n, r in pods) <= CPU_BUDGET
    assert sum(n * memory(r["memory"]) for n, r in pods) <= MEMORY_BUDGET


def test_helm_renders_the_profile_within_the_budget(helm: Helm, chart: Path) -> None:
    helm("lint", "--strict", str(chart), "-f", str(DEV))
    rendered = helm("template", "gozon", str(chart), "--namespace", "gozon", "-f", str(DEV))
    total_cpu, total_memory = 0.0, 0
    for doc in yaml.safe_load_all(rendered.stdout):
        if not doc:
            continue
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"].get("replicas", 1) == 1, doc["metadata"]["name"]
            for container in doc["spec"]["template"]["spec"]["containers"]:
                requests = container.get("resources", {}).get("requests", {})
                total_cpu += cpu(requests.get("cpu", 0))
                total_memory += memory(requests.get("memory", 0))
        elif doc["kind"] == "KafkaNodePool":
            requests = doc["spec"]["resources"]["requests"]
            total_cpu += doc["spec"]["replicas"] * cpu(requests["cpu"])
            total_memory += doc["spec"]["replicas"] * memory(requests["memory"])
        assert doc["kind"] != "HorizontalPodAutoscaler", doc["metadata"]["name"]
    assert total_cpu <= CPU_BUDGET
    assert total_memory <= MEMORY_BUDGET
