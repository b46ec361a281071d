"""devstack.kafka_jars resolves Kafka's jars once even when several processes ask at once (the
pytest-xdist workers of `make test` on a fresh checkout). Maven is replaced by a script that
counts its runs and takes a second, so that the callers overlap; what is tested is the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_MVN = """#!/usr/bin/env bash
set -eu
echo run >> "$MVN_RUNS"
for arg in "$@"; do
  case $arg in
    -DoutputDirectory=*) out=${arg#-DoutputDirectory=} ;;
    -Dkafka.version=*) version=${arg#-Dkafka.version=} ;;
  esac
done
sleep 1
mkdir -p "$out"
touch "$out/kafka_2.13-$version.jar"
"""


def test_three_processes_at_once_resolve_the_jars_once(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mvn").write_text(FAKE_MVN)
    (bin_dir / "mvn").chmod(0o755)
    runs = tmp_path / "mvn-runs"
    cache = tmp_path / "cache"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MVN_RUNS": str(runs)}
    code = (
        "import pathlib, sys; from devstack.kafka import kafka_jars; "
        "print(kafka_jars(pathlib.Path(sys.argv[1]), '9.9.9'))"
    )
    callers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    answers = [caller.communicate(timeout=60) for caller in callers]
    assert [caller.returncode for caller in callers] == [0, 0, 0], answers
    libs = cache / "kafka-9.9.9" / "libs"
    assert {out.strip() for out, _ in answers} == {str(libs)}
    assert (libs / "kafka_2.13-9.9.9.jar").exists()
    assert runs.read_text().splitlines() == ["run"], "Maven ran more than once"
    assert not (libs.parent / "libs.partial").exists()
