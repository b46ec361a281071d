"""devstack.apt_install lets its callers take turns: `apt-get update` fails at once when another
holds its lists lock (measured on Debian's apt), and `make test`'s pytest-xdist workers on a fresh
machine all find PostgreSQL missing together. apt-get is replaced by a script that fails the same
way when another run of it is in progress; what is tested is the turn-taking."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_APT_GET = """#!/usr/bin/env bash
if ! mkdir "$APT_BUSY" 2>/dev/null; then
  echo "E: Could not get lock /var/lib/apt/lists/lock" >&2
  exit 100
fi
echo "$*" >> "$APT_RUNS"
sleep 0.3
rmdir "$APT_BUSY"
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="apt_install refuses to run apt-get unless root")
def test_three_callers_at_once_take_turns(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    runs = tmp_path / "apt-runs"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "APT_BUSY": str(tmp_path / "busy"),
        "APT_RUNS": str(runs),
        "TMPDIR": str(tmp_path),  # the turn's lock file: this test's own
    }
    code = "from devstack.apt import apt_install; apt_install('postgresql', why='a test')"
    callers = [
        subprocess.Popen(
            [sys.executable, "-c", code],
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
    lines = runs.read_text().splitlines()
    assert [line.split()[-1] for line in lines] == ["-q", "postgresql"] * 3, lines
