"""The process table is the one list of what runs: everything that starts the platform agrees.

docker-compose.yml's agreement test is tests/unit/test_compose.py.
"""

from __future__ import annotations

import pytest

from gozon.cli import build_parser
from gozon.processes import MIGRATIONS, PROCESSES, Migration, Process, process
from scripts.stack import procfile_entries


def test_names_ports_and_settings_are_unique() -> None:
    for attribute in ("name", "port_setting", "default_port", "args"):
        values = [getattr(p, attribute) for p in PROCESSES]
        assert len(values) == len(set(values)), f"duplicate {attribute}: {values}"
    assert len(PROCESSES) == 7


@pytest.mark.parametrize("entry", [*PROCESSES, *MIGRATIONS], ids=lambda p: p.name)
def test_every_command_is_one_the_cli_runs(entry: Process | Migration) -> None:
    args = build_parser().parse_args(list(entry.args))
    assert callable(getattr(args, "run", None))


def test_the_procfile_runs_exactly_the_table() -> None:
    assert procfile_entries() == {p.name: p.command for p in PROCESSES}


def test_an_unknown_process_is_named_with_the_known_ones() -> None:
    assert process("orders-relay").args == ("orders", "relay")
    with pytest.raises(KeyError, match="known: gateway, orders-api"):
        process("order-relay")
