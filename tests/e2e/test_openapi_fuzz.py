"""schemathesis against the gateway's OpenAPI document, with every process of the platform
real behind it: every check on, zero failures.

The run is schemathesis' own command line, as a person would run it, on the configuration kept
at the repository's root (`schemathesis.toml`: a fixed seed, a few hundred examples per
operation, all checks, and the few documented exceptions). Its pytest plugin is not used: it
does not work with pytest 9.2 (it sets `Function._nodeid`, which pytest no longer has).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.timeout(1800)
def test_the_gateway_answers_as_its_document_says(platform: Platform, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(ROOT / "schemathesis.toml"),
            "run",
            f"{platform.gateway}/openapi.json",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    print(run.stdout[-20_000:])  # the summary: operations, cases, checks (shown with -s or -rA)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
