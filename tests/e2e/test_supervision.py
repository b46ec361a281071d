"""`make up`'s supervision, through the launcher itself: a process killed with SIGKILL is
restarted while the other six keep answering, the status shows the restart, and stopping
stops exactly what was started (even the processes of a supervisord that was killed)."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import port_for
import pytest

from devstack import Kafka, Platform, Postgres, StackConfig, http_status, wait_for
from devstack.cli import status
from devstack.supervisor import processes_marked
from devstack.system import pid_alive
from gozon.processes import PROCESSES, process
from tests.conftest import fresh_database

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def launched(
    logs_dir: Path,
    postgres: Postgres,
    orders_template: str,
    payments_template: str,
    kafka: Kafka,
) -> Iterator[Platform]:
    """The platform under the launcher, once for this module (its start is the slow part)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _launch(
            logs_dir / "supervision",
            postgres,
            orders_template,
            payments_template,
            kafka,
            monkeypatch,
        )


def _launch(
    tmp_path: Path,
    postgres: Postgres,
    orders_template: str,
    payments_template: str,
    kafka: Kafka,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Platform]:
    orders_dbs = fresh_database(postgres, orders_template)
    payments_dbs = fresh_database(postgres, payments_template)
    ports: list[int] = []
    for entry in PROCESSES:
        for setting in entry.ports:
            ports.append(port_for.select_random(exclude_ports=ports))
            # `status` reads the ports from the environment, as `make status` does
            monkeypatch.setenv(setting, str(ports[-1]))
    monkeypatch.setenv("GOZON_PG_PORT", str(postgres.port))
    monkeypatch.setenv("GOZON_KAFKA_PORT", str(kafka.port))
    monkeypatch.setenv("GOZON_KAFKA_CONTROLLER_PORT", str(kafka.controller_port))
    monkeypatch.setenv("GOZON_DATA_DIR", str(tmp_path / "stack"))
    env = {
        "GOZON_ORDERS_DATABASE_URL": next(orders_dbs),
        "GOZON_PAYMENTS_DATABASE_URL": next(payments_dbs),
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "GOZON_GATEWAY_ORDERS_URL": f"http://127.0.0.1:{os.environ['GOZON_ORDERS_API_PORT']}",
        "GOZON_GATEWAY_PAYMENTS_URL": f"http://127.0.0.1:{os.environ['GOZON_PAYMENTS_API_PORT']}",
    }
    platform = Platform(StackConfig.from_env())
    try:
        platform.start(env, timeout=180)
        yield platform
    finally:
        platform.stop()
        for generator in (orders_dbs, payments_dbs):
            next(generator, None)


def _url(name: str) -> str:
    entry = process(name)
    return f"http://127.0.0.1:{os.environ[entry.port_setting]}"


@pytest.mark.parametrize("victim", ["orders-api", "payments-consumer"])
def test_a_killed_process_is_restarted_while_the_others_keep_answering(
    launched: Platform, victim: str
) -> None:
    # RUNNING: up for supervisord's `startsecs` (a process may answer before that).
    wait_for(
        lambda: {state.state for state in launched.states().values()} == {"RUNNING"},
        timeout=60,
        what="every process RUNNING",
    )
    before = launched.states()
    restarts = {name: state.restarts for name, state in before.items()}
    os.kill(before[victim].pid, signal.SIGKILL)

    others = [p.name for p in PROCESSES if p.name != victim]
    wait_for(
        lambda: launched.states()[victim].pid != before[victim].pid,
        timeout=180,
        what=f"{victim} restarted",
    )
    # The six others never stopped: same pids, and they answer.
    for name in others:
        assert launched.states()[name].pid == before[name].pid, name
        assert http_status(_url(name) + "/health/live") == 200, name
    wait_for(
        lambda: http_status(_url(victim) + "/health/ready") == 200,
        timeout=180,
        what=f"{victim} ready again",
    )
    wait_for(
        lambda: launched.states()[victim].state == "RUNNING", timeout=60, what=f"{victim} RUNNING"
    )
    after = launched.states()
    assert after[victim].restarts == restarts[victim] + 1
    assert all(after[name].restarts == restarts[name] for name in others)

    shown = io.StringIO()
    with redirect_stdout(shown):
        status(launched.config)
    line = next(row for row in shown.getvalue().splitlines() if row.split()[:1] == [victim])
    assert "RUNNING" in line
    assert f"restarts {after[victim].restarts} " in line
    assert f"pid {after[victim].pid} " in line


# Last in this module: it takes the launched platform down.
def test_stopping_stops_what_was_started_even_after_supervisord_was_killed(
    launched: Platform,
) -> None:
    pids = [state.pid for state in launched.states().values()]
    supervisord = launched.pidfile.pid()
    assert supervisord is not None
    os.kill(supervisord, signal.SIGKILL)  # its processes are left running on their own
    wait_for(lambda: not pid_alive(supervisord), timeout=10, what="supervisord gone")
    assert sorted(processes_marked(str(launched.conf))) == sorted(pids)

    assert launched.stop() is True
    assert not [pid for pid in pids if pid_alive(pid)]
    assert processes_marked(str(launched.conf)) == []
