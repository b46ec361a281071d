"""The dev stack's installers take turns when several processes call them at once, as `make
test`'s pytest-xdist workers do on a fresh clone or machine. Each test replaces the tool that
is installed or run (Maven, apt-get) by a script on PATH that takes a moment and records its
runs, calls the installer from three processes at once, and checks the records: what is
tested is the turn-taking, not the tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_MVN = """#!/usr/bin/env bash
set -eu
echo run >> "$RUNS"
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

# Fails the way Debian's apt-get update does when another holds its lists lock (measured).
FAKE_APT_GET = """#!/usr/bin/env bash
if ! mkdir "$APT_BUSY" 2>/dev/null; then
  echo "E: Could not get lock /var/lib/apt/lists/lock" >&2
  exit 100
fi
echo "$*" >> "$RUNS"
sleep 0.3
rmdir "$APT_BUSY"
"""


def three_at_once(
    tmp_path: Path, tool: str, script: str, code: str, *args: str, **env: str
) -> list[str]:
    """Runs `python -c code args` in three processes at once with `script` as `tool` on PATH;
    asserts each exits 0 and returns their standard outputs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / tool).write_text(script)
    (bin_dir / tool).chmod(0o755)
    environ = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RUNS": str(tmp_path / "runs"),
        **env,
    }
    callers = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    answers = [caller.communicate(timeout=60) for caller in callers]
    assert [caller.returncode for caller in callers] == [0, 0, 0], answers
    return [out for out, _ in answers]


def test_three_processes_at_once_resolve_the_kafka_jars_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = (
        "import pathlib, sys; from devstack.kafka import kafka_jars; "
        "print(kafka_jars(pathlib.Path(sys.argv[1]), '9.9.9'))"
    )
    outs = three_at_once(tmp_path, "mvn", FAKE_MVN, code, str(cache))
    libs = cache / "kafka-9.9.9" / "libs"
    assert {out.strip() for out in outs} == {str(libs)}
    assert (libs / "kafka_2.13-9.9.9.jar").exists()
    assert (tmp_path / "runs").read_text().splitlines() == ["run"], "Maven ran more than once"
    assert not (libs.parent / "libs.partial").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="apt_install refuses to run apt-get unless root")
def test_three_apt_install_callers_at_once_take_turns(tmp_path: Path) -> None:
    code = "from devstack.apt import apt_install; apt_install('postgresql', why='a test')"
    three_at_once(
        tmp_path,
        "apt-get",
        FAKE_APT_GET,
        code,
        APT_BUSY=str(tmp_path / "busy"),
        TMPDIR=str(tmp_path),  # the turn's lock file: this test's own
    )
    lines = (tmp_path / "runs").read_text().splitlines()
    assert [line.split()[-1] for line in lines] == ["-q", "postgresql"] * 3, lines
