"""Helpers of the chart tests: the tools' paths, running them, the CRDs as kubeconform schemas,
and what to print about a cluster when a test fails. Fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from devstack.system import ROOT
from scripts.kube_cluster import LocalCluster, tools_bin

CRD_DIR = ROOT / "k8s" / "crds"
KUBE_VERSION = "1.37.0"  # the schemas and the local control plane: scripts/k8s-tools


def chart_dir() -> Path:
    """The chart under test; GOZON_CHART_DIR points the suite at another copy."""
    return Path(os.environ.get("GOZON_CHART_DIR", ROOT / "charts" / "gozon")).resolve()


def ci_values_files() -> list[Path]:
    return sorted((chart_dir() / "ci").glob("*.yaml"))


def tool(name: str) -> str:
    path = tools_bin() / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/k8s-tools (make test-chart does)")
    return str(path)


class CommandFailed(AssertionError):
    pass


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Runs a tool; a failure raises with the command line and all it printed."""
    done = subprocess.run(
        list(cmd),
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise CommandFailed(
            f"`{' '.join(cmd)}` exited {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    return done


@dataclass(frozen=True)
class Helm:
    """helm with the session's own homes and the cached plugins."""

    env: dict[str, str]
    binary: str

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        return run([self.binary, *args], env=self.env, check=check, timeout=timeout)


_CONSTRAINTS = ("oneOf", "anyOf", "allOf", "not")


def _strict(schema: object, constraint: bool = False) -> object:
    """An OpenAPI v3 CRD schema as a JSON schema that refuses unknown fields.

    What the API server does with `fieldValidation=Strict`: an object that lists its
    properties accepts no others, unless it says it preserves unknown fields; int-or-string
    and nullable become JSON schema types. The branches of oneOf/anyOf/allOf/not are value
    constraints on the object around them (a structural schema's rule), never closed objects:
    `{properties: {value: {}}, required: [value]}` says "value is set", not "only value".
    """
    if isinstance(schema, list):
        return [_strict(item, constraint) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: _strict(value, constraint or key in _CONSTRAINTS)
        for key, value in schema.items()
        if not key.startswith("x-kubernetes-")
    }
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if (
        "properties" in out
        and not constraint
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_documents() -> list[dict[str, object]]:
    docs = []
    for path in sorted(CRD_DIR.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def write_crd_schemas(target: Path) -> list[str]:
    """kubeconform schemas `<group>/<kind>_<version>.json` for every served CRD version."""
    written = []
    for crd in crd_documents():
        spec = crd["spec"]
        assert isinstance(spec, dict)
        group, kind = spec["group"], spec["names"]["kind"].lower()
        for version in spec["versions"]:
            if not version.get("served"):
                continue
            schema = dict(_strict(version["schema"]["openAPIV3Schema"]))  # type: ignore[call-overload]
            # apiVersion and kind pin the document to this CRD version.
            properties = dict(schema.get("properties", {}))
            properties["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
            properties["kind"] = {"type": "string", "enum": [spec["names"]["kind"]]}
            schema["properties"] = properties
            path = target / group / f"{kind}_{version['name']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(schema))
            written.append(f"{group}/{version['name']}/{spec['names']['kind']}")
    return written


@dataclass(frozen=True)
class Schemas:
    kubernetes: Path
    crds: Path
    crd_kinds: list[str]

    def locations(self) -> list[str]:
        return [
            "-schema-location",
            f"{self.kubernetes}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
            "-schema-location",
            f"{self.crds}/{{{{ .Group }}}}/"
            f"{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
        ]


def api_versions() -> list[str]:
    """`--api-versions` flags: the CRDs in k8s/crds are present, as on a prepared cluster."""
    flags = []
    for crd in crd_documents():
        spec = crd["spec"]
        assert isinstance(spec, dict)
        for version in spec["versions"]:
            flags += ["--api-versions", f"{spec['group']}/{version['name']}"]
            flags += [
                "--api-versions",
                f"{spec['group']}/{version['name']}/{spec['names']['kind']}",
            ]
    return flags


def collect_diagnostics(
    cluster: LocalCluster, api: client.ApiClient, namespaces: Sequence[str]
) -> str:
    core = client.CoreV1Api(api)
    lines: list[str] = []
    for ns in namespaces:
        lines.append(f"== namespace {ns}: events")
        try:
            for ev in core.list_namespaced_event(ns).items:
                obj = ev.involved_object
                lines.append(f"  {ev.type:<8} {ev.reason:<24} {obj.kind}/{obj.name}: {ev.message}")
            lines.append(f"== namespace {ns}: pods")
            pod: Any
            for pod in core.list_namespaced_pod(ns).items:
                conditions = {c.type: c.status for c in pod.status.conditions or []}
                where = f"node={pod.spec.node_name}"
                lines.append(f"  {pod.metadata.name}: {pod.status.phase} {conditions} {where}")
        except client.ApiException as exc:
            lines.append(f"  (could not read: {exc.reason})")
    for component in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        log = cluster.logs / f"{component}.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            lines.append(f"== {log} (last lines)")
            lines += [f"  {line}" for line in tail]
    return "\n".join(lines)
