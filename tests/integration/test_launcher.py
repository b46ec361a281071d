"""The launcher is honest: a taken port is named, a second start reuses, stop stops only ours,
and a process is reported failed at start-up only when it really is."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import port_for
import pytest

from devstack import Kafka, Platform, Postgres, StackConfig, StackError, system, wait_for
from devstack.supervisor import START_RETRIES
from devstack.system import PidFile
from gozon.processes import Process

pytestmark = pytest.mark.integration


@pytest.fixture
def squatter() -> Iterator[int]:
    """A port held by a program that is not ours."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_postgres_on_a_taken_port_names_the_port(servers_dir: Path, squatter: int) -> None:
    server = Postgres(servers_dir / "pg-squatted", squatter, durable=False)
    with pytest.raises(StackError, match=rf"port {squatter} is taken by another program"):
        server.start()
    assert server.running_pid() is None


def test_kafka_on_a_taken_port_names_the_port(servers_dir: Path, squatter: int) -> None:
    server = Kafka(
        servers_dir / "kafka-squatted",
        squatter,
        port_for.select_random(exclude_ports=[squatter]),
        cache_dir=StackConfig.from_env().cache_dir,
    )
    with pytest.raises(StackError, match=rf"port {squatter} is taken by another program"):
        server.start()
    assert server.running_pid() is None


def test_a_second_start_reuses_the_running_servers(postgres: Postgres, kafka: Kafka) -> None:
    pg_pid, kafka_pid = postgres.running_pid(), kafka.running_pid()
    assert pg_pid is not None
    assert kafka_pid is not None
    assert postgres.start() is False
    assert kafka.start() is False
    assert (postgres.running_pid(), kafka.running_pid()) == (pg_pid, kafka_pid)


def test_stop_never_signals_a_process_that_is_not_ours(tmp_path: Path) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pidfile = PidFile(tmp_path / "x.pid", marker=str(tmp_path / "our-config"))
        pidfile.write(stranger.pid)  # a recycled pid: the number matches, the process is not ours
        assert pidfile.pid() is None
        assert pidfile.stop(timeout=1) is False
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_child_we_spawned_is_ours_before_its_command_line_is_readable(tmp_path: Path) -> None:
    """Just after exec a process's /proc cmdline can read empty (seen with kube-scheduler and
    kwok): the marker test alone called such a child gone and its start "exited". A child we
    spawned and have not reaped is ours whatever its command line says."""
    pidfile = PidFile(tmp_path / "child.pid", marker=str(tmp_path / "not-on-its-command-line"))
    child = pidfile.spawn(
        [sys.executable, "-c", "import time; time.sleep(30)"], log=tmp_path / "child.log"
    )
    assert pidfile.pid() == child.pid
    assert pidfile.stop(timeout=5) is True
    assert child.poll() is not None
    assert pidfile.pid() is None


def test_stop_stops_our_child_even_when_its_pid_file_is_gone(tmp_path: Path) -> None:
    pidfile = PidFile(tmp_path / "child.pid", marker=str(tmp_path))
    child = pidfile.spawn(
        [sys.executable, "-c", "import time; time.sleep(30)"], log=tmp_path / "child.log"
    )
    pidfile.path.unlink()
    assert pidfile.stop(timeout=5) is True  # returns at once: never waits on a live child
    assert child.poll() is not None


# --------------------------------------------------------------------------- supervisord

FAKE = """
import http.server, pathlib, sys, time

mode, port, flag = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
if mode == "always-exits" or (mode == "exits-once" and not flag.exists()):
    flag.write_text("exited")
    sys.exit(3)
while mode == "gated" and not flag.exists():
    time.sleep(0.1)


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def fake_platform(
    tmp_path: Path, modes: dict[str, str], *, start_retries: int = START_RETRIES
) -> Platform:
    """A Platform under a real supervisord whose processes are small HTTP servers that behave
    as `modes` says: `exits-once` exits at its first start, `always-exits` at every start,
    `gated` answers only once its flag file exists, `steady` at once."""
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    ports: list[int] = []
    table = []
    for name in modes:
        ports.append(port_for.select_random(exclude_ports=ports))
        setting = f"GOZON_TEST_{name.upper().replace('-', '_')}_PORT"
        table.append(Process(name, (name,), "api", "orders", setting, ports[-1]))

    def command(entry: Process) -> str:
        flag = tmp_path / f"{entry.name}.flag"
        return f"{sys.executable} {script} {modes[entry.name]} {entry.default_port} {flag}"

    config = StackConfig.from_env({"GOZON_DATA_DIR": str(tmp_path / "stack")})
    return Platform(config, table, command, start_retries)


def test_a_process_that_exits_while_starting_is_restarted_and_waited_for(tmp_path: Path) -> None:
    platform = fake_platform(tmp_path, {"flaky": "exits-once", "steady": "steady"})
    try:
        urls = platform.start({}, timeout=120)
        assert set(urls) == {"flaky", "steady"}
        assert (tmp_path / "flaky.flag").exists()  # it did exit once
        assert platform.states()["flaky"].restarts >= 1
    finally:
        platform.stop()


def test_a_second_start_is_not_fooled_by_a_command_line_that_reads_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make up` again while the first is still waiting: supervisord is then not our child,
    and /proc/<pid>/cmdline of a live process can read empty. Checking the marker on every
    poll reported a process that was starting fine as "exited while starting"."""
    first = fake_platform(tmp_path, {"gated": "gated", "steady": "steady"})
    try:
        with ThreadPoolExecutor(1) as pool:
            starting = pool.submit(first.start, {}, 120)
            wait_for(
                lambda: first.states().get("gated", None) is not None,
                timeout=60,
                what="supervisord to answer",
            )
            # the same stack, as a new `make up` finds it
            second = Platform(first.config, first.processes, first.command)
            reads = []
            real = system.cmdline

            def empty_after_the_first_read(pid: int) -> str:
                reads.append(pid)
                return real(pid) if len(reads) == 1 else ""

            monkeypatch.setattr(system, "cmdline", empty_after_the_first_read)
            threading.Timer(2, (tmp_path / "gated.flag").touch).start()
            assert set(second.start({}, timeout=120)) == {"gated", "steady"}
            assert len(reads) > 1  # the empty reads did happen
            assert set(starting.result(timeout=120)) == {"gated", "steady"}
    finally:
        monkeypatch.undo()
        first.stop()


def test_a_process_that_never_starts_is_reported_once_supervisord_gives_up(
    tmp_path: Path,
) -> None:
    platform = fake_platform(
        tmp_path, {"broken": "always-exits", "steady": "steady"}, start_retries=1
    )
    try:
        with pytest.raises(StackError, match="the broken process kept exiting at start-up"):
            platform.start({}, timeout=120)
    finally:
        platform.stop()
