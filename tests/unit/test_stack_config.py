from __future__ import annotations

import socket
from pathlib import Path

import pytest

from scripts.stack import StackConfig, StackError, port_is_free, procfile_entries


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


def test_procfile_entries_skip_comments_and_blank_lines(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text("# comment\n\norders-api: gozon orders api\nrelay:gozon orders relay\n")
    assert procfile_entries(procfile) == {
        "orders-api": "gozon orders api",
        "relay": "gozon orders relay",
    }
