"""Real `gozon …` processes, for the tests and the benches (not `make up`'s: see `Platform`).

`GozonProcess` runs `gozon <args>` of this interpreter's virtualenv (`GOZON`) with its own
environment, its output appended to a log file; `start()` waits for its `/health/live` (or
`/health/ready`) and fails with the log's tail if it exits first; `stop()` is SIGTERM, as an
orchestrator sends, and fails if it is ignored; `kill()` is SIGKILL. `wait_for` polls a
condition against a deadline; `http_status` is a GET's status code, or None without an answer.
Failures are `AssertionError`s: these are the tests' checks. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

GOZON = str(Path(sys.executable).with_name("gozon"))


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_for(predicate: object, *, timeout: float, what: str, interval: float = 0.05) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class GozonProcess:
    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        health_url: str,
    ) -> None:
        self.args = list(args)
        self.env = {**os.environ, "GOZON_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", **env}
        self.log = log
        self.health_url = health_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, ready: bool = False, timeout: float = 120) -> GozonProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [GOZON, *self.args], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        endpoint = "/health/ready" if ready else "/health/live"
        wait_for(
            lambda: self._check_alive() and http_status(self.health_url + endpoint) == 200,
            timeout=timeout,
            what=f"gozon {' '.join(self.args)} {endpoint} (log: {self.log})",
        )
        return self

    def _check_alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"gozon {' '.join(self.args)} exited early:\n{tail}")
        return True

    def status(self, endpoint: str = "/health/ready") -> int | None:
        # A busy machine may take seconds to answer: a slow answer is not "no answer".
        return http_status(self.health_url + endpoint, timeout=10)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, as an orchestrator does; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"gozon {' '.join(self.args)} ignored SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
