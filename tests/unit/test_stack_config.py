from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import StackConfig, StackError
from devstack.supervisor import restart_counts
from devstack.system import port_is_free


def test_ports_and_folders_come_from_gozon_variables(tmp_path: Path) -> None:
    config = StackConfig.from_env(
        {"GOZON_DATA_DIR": str(tmp_path), "GOZON_PG_PORT": "6543", "GOZON_KAFKA_PORT": "19092"}
    )
    assert (config.pg_port, config.kafka_port, config.kafka_controller_port) == (6543, 19092, 9093)
    assert config.cache_dir == tmp_path / "cache"
    assert config.postgres().url("order_db").endswith("@127.0.0.1:6543/order_db")


@pytest.mark.parametrize("bad", ["", "abc", "0", "70000", "-1"])
def test_a_bad_port_setting_is_a_clear_error(bad: str) -> None:
    with pytest.raises(StackError, match="GOZON_PG_PORT"):
        StackConfig.from_env({"GOZON_PG_PORT": bad})


def test_a_listening_port_is_not_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.listen()
        assert not port_is_free(port)
    assert port_is_free(port)


def test_restarts_are_counted_from_supervisords_last_start(tmp_path: Path) -> None:
    log = tmp_path / "supervisord.log"
    log.write_text(
        "INFO supervisord started with pid 10\n"
        "INFO spawned: 'orders-api' with pid 11\n"
        "INFO spawned: 'orders-api' with pid 12\n"
        "INFO supervisord started with pid 20\n"  # a later `make up`: counting starts again
        "INFO spawned: 'orders-api' with pid 21\n"
        "INFO spawned: 'gateway' with pid 22\n"
        "INFO exited: orders-api (terminated by SIGKILL; not expected)\n"
        "INFO spawned: 'orders-api' with pid 23\n"
    )
    assert restart_counts(log) == {"orders-api": 1, "gateway": 0}
    assert restart_counts(tmp_path / "missing.log") == {}


def test_the_dev_stack_imports_only_the_standard_library() -> None:
    """`make down` and `make status` run before `.venv` exists: without site-packages (-S),
    the package and its CLI still import, and nothing but the process table comes along."""
    root = Path(__file__).resolve().parents[2]
    probe = (
        "import sys, devstack.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)))"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[0] == "['__main__', 'devstack', 'gozon']"
