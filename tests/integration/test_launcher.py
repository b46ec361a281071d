"""The launcher is honest: a taken port is named, a second start reuses, stop stops only ours."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest

from scripts.stack import Kafka, PidFile, Postgres, StackConfig, StackError

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
