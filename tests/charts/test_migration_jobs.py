"""The bundled-mode migration Jobs under `helm template`-based GitOps (Argo CD, Flux).

A Job's `spec.template` is immutable: a tool that re-renders the chart and applies it must
either find the same Job or a Job of another name, never the same name with another spec. So
each Job is named by a hash of its own spec (`gozon.migrationJobName`), never by the release's
revision (`helm template` always renders revision 1), and nothing random may reach that spec
(the bundled databases' passwords are drawn again at every render without a cluster). The same
rule on a live API server, across a real `helm upgrade`, is in test_install.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.charts.test_process_table_chart import CHART, Manifest, of_kind, render

JOB_NAME = re.compile(r"^shop-gozon-(orders|payments)-migrate-[0-9a-f]{8}$")


def jobs(tmp_path: Path, *sets: str) -> dict[str, Manifest]:
    return of_kind(render(tmp_path, sets=sets), "Job")


def by_service(found: dict[str, Manifest]) -> dict[str, tuple[str, Manifest]]:
    return {
        job["spec"]["template"]["spec"]["containers"][0]["args"][0]: (name, job["spec"])
        for name, job in found.items()
    }


def test_each_migration_job_is_named_by_a_hash_of_its_spec(tmp_path: Path) -> None:
    names = sorted(jobs(tmp_path))
    assert len(names) == 2
    assert all(JOB_NAME.match(name) for name in names), names


def test_two_renders_give_identical_jobs(tmp_path: Path) -> None:
    """Each render draws new database passwords; none of it may reach the Jobs."""
    assert jobs(tmp_path / "first") == jobs(tmp_path / "second")


@pytest.mark.parametrize(
    "change",
    [
        "image.tag=0.2.0",
        "migrations.resources.limits.memory=512Mi",
        "config.GOZON_LOG_LEVEL=DEBUG",
    ],
)
def test_a_change_the_job_runs_gives_new_names(tmp_path: Path, change: str) -> None:
    before = by_service(jobs(tmp_path / "before"))
    after = by_service(jobs(tmp_path / "after", change))
    for service in ("orders", "payments"):
        assert before[service][1] != after[service][1]
        assert before[service][0] != after[service][0], change


def test_a_change_elsewhere_keeps_the_jobs(tmp_path: Path) -> None:
    """An upgrade that only scales or reconfigures a Deployment leaves the completed Jobs be."""
    before = jobs(tmp_path / "before")
    after = jobs(tmp_path / "after", "processes.gateway.replicas=4", "ingress.enabled=true")
    assert before == after


def test_a_long_release_name_still_fits_the_job_name_label(tmp_path: Path) -> None:
    sets = (
        "fullnameOverride=" + "x" * 40,  # the schema's longest
        "kafka.mode=external",  # Strimzi's pod names cap the name lower still
        "kafka.external.bootstrapServers=kafka:9092",
    )
    names = list(jobs(tmp_path, *sets))
    assert len(names) == 2
    assert all(len(name) <= 63 for name in names), names


def test_no_template_depends_on_the_release_revision() -> None:
    """`helm template` renders revision 1 every time: a name or spec built from the revision
    would differ between Helm's upgrades and a GitOps tool's renders."""
    users = [
        str(path.relative_to(CHART))
        for path in sorted((CHART / "templates").rglob("*"))
        if path.is_file() and ".Release.Revision" in path.read_text()
    ]
    assert users == []
