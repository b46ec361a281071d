"""This machine's processes and ports, as the dev stack uses them.

What it guarantees:
- A process we start is recorded in a pid file with a marker (a path in our data folder) that
  must be on its command line: a recycled pid is never signalled (`PidFile`).
- A wait polls against a deadline and fails with a message naming the cause: a port taken by
  another program, a process that exited, the tail of its log (`wait_until`, `StackError`).

Standard library only: `make down` and `make status` run before the virtualenv exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """A failure a person can act on; the message names the cause."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on the port (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free_port(port: int, what: str) -> None:
    if not port_is_free(port):
        raise StackError(
            f"port {port} is taken by another program, so {what} cannot listen on it; "
            f"stop that program or choose another port (see README: changing ports)"
        )


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    failed: Callable[[], str | None] = lambda: None,
    log: Path | None = None,
) -> None:
    """Polls `ready` until it is true; fails fast when `alive` turns false or `failed` names a
    failure (its message is used), or at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if ready():
            return
        if not alive():
            raise StackError(f"{what} exited while starting{log_tail(log)}")
        failure = failed()
        if failure is not None:
            raise StackError(f"{failure}{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready after {timeout:.0f} s{log_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; the last lines of {log}:\n  " + "\n  ".join(tail)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class PidFile:
    """A process we started: its pid, recorded with a marker that must be on its command line.

    The marker (a path inside our data folder) makes a recycled pid harmless: a process whose
    command line lacks it is not ours and is never signalled.
    """

    path: Path
    marker: str
    _child: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def spawn(
        self,
        cmd: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Starts a detached process (own session), output appended to `log`, pid recorded."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self._child = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.write(self._child.pid)
        return self._child

    def pid(self) -> int | None:
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        if self._child is not None and self._child.pid == pid:
            # Our own unreaped child: its pid cannot have been recycled. (Just after exec its
            # /proc cmdline can still read empty, so the marker test would call it gone.)
            return pid if self._child.poll() is None else None
        if pid_alive(pid) and self.marker in cmdline(pid):
            return pid
        return None

    def running(self, pid: int) -> bool:
        """Whether `pid`, found ours by `pid()` earlier, still runs. The command line is not
        read again: a read that comes back empty (it can, for a live process) would call a
        running process gone; a pid recycled within the seconds of a start is not a risk."""
        if self._child is not None and self._child.pid == pid:
            return self._child.poll() is None
        return pid_alive(pid)

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n")

    def stop(self, *, timeout: float, group: bool = False) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True if something of ours was running."""
        pid = self.pid()
        if pid is None:
            self.path.unlink(missing_ok=True)
            if self._child is not None:
                # Our own child, yet its pid file is gone: stop it all the same (never wait on
                # a live child), then reap it; one that died on its own is only reaped.
                running = self._child.poll() is None
                if running:
                    self._child.kill()
                self._child.wait()
                self._child = None
                return running
            return False
        kill = os.killpg if group else os.kill
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        if group:
            # Children that outlived their parent still carry its process group id.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)
        if self._child is not None:  # we are its parent (a test session): reap it
            self._child.wait()
            self._child = None
        return True


@contextlib.contextmanager
def one_at_a_time(lock_file: Path) -> Iterator[None]:
    """Holds an exclusive flock on `lock_file` (created if missing) for the block: callers in
    other processes wait their turn. Released when the block ends, or the process does."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run(
    cmd: Sequence[str], *, what: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> str:
    try:
        done = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            env=dict(env) if env else None,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise StackError(f"{what} failed: {cmd[0]} is not installed") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise StackError(f"{what} failed (exit {done.returncode}):\n  " + "\n  ".join(output))
    return done.stdout


def terminate(pid: int, *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
