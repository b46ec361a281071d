"""What the dev stack installs from Debian's packages, only where it is missing.

Installing needs root; as another user the error names the packages to install. Another
apt-get on the machine (a second checkout, unattended upgrades) is waited for, and callers of
this module take turns (`make test`'s pytest-xdist workers on a fresh machine each find
PostgreSQL missing at once: `apt-get update` does not wait for another's lock, it fails).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from devstack.system import StackError, one_at_a_time, run


def apt_install(*packages: str, why: str) -> None:
    if os.geteuid() != 0:
        raise StackError(f"{why}; install the Debian packages {' '.join(packages)} (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(packages)} from Debian's packages ({why})", file=sys.stderr)
    # another apt-get on the machine (a second helper, unattended upgrades) is waited for
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    with one_at_a_time(Path(tempfile.gettempdir()) / "gozon-apt.lock"):
        run(["apt-get", *lock, "update", "-q"], what="apt-get update", env=env)
        run(
            ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages],
            what=f"apt-get install {' '.join(packages)}",
            env=env,
        )


def prometheus_tool(name: str = "promtool") -> Path:
    """Debian's `prometheus` or `promtool` binary, installing the `prometheus` package when it
    is missing (the alert rules' unit tests and the live dashboard and alert checks use them).

    The tests run their own servers on free ports; where systemd runs, the package also
    enables a server of its own on :9090 (`systemctl disable --now prometheus` stops it).
    """
    found = shutil.which(name)
    if found is None:
        apt_install("prometheus", why=f"{name} was not found")
        found = shutil.which(name)
        if found is None:
            raise StackError(f"installed Debian's prometheus, but found no {name}")
    return Path(found)
