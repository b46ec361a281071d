"""The process table is the one list of what runs: everything that starts the platform agrees.

The supervisor's configuration is generated from it; this checks the generated file itself.
docker-compose.yml's agreement test is tests/unit/test_compose.py, the Helm chart's
tests/charts/test_process_table_chart.py.
"""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from devstack import supervisor_config
from devstack.supervisor import START_RETRIES, process_log
from gozon.cli import _COMPOSITIONS, build_parser
from gozon.gateway.settings import GatewaySettings
from gozon.orders.settings import OrdersSettings
from gozon.payments.settings import PaymentsSettings
from gozon.processes import MIGRATIONS, PROCESSES, SERVICES, Migration, Process, Service, process


def test_names_ports_and_settings_are_unique() -> None:
    for attribute in ("name", "port_setting", "default_port", "args"):
        values = [getattr(p, attribute) for p in PROCESSES]
        assert len(values) == len(set(values)), f"duplicate {attribute}: {values}"
    assert len(PROCESSES) == 7
    # side ports included: no two processes listen on the same port or read the same setting
    settings = [setting for p in PROCESSES for setting in p.ports]
    ports = [port for p in PROCESSES for port in p.ports.values()]
    assert len(settings) == len(set(settings)), settings
    assert len(ports) == len(set(ports)), ports


def test_only_the_gateway_serves_its_metrics_on_a_side_port() -> None:
    # its own port is public; the APIs' are reached only from the gateway, the workers'
    # port is a side port already
    assert {p.name: p.metrics_port_setting for p in PROCESSES if p.side_port_setting} == {
        "gateway": "GOZON_GATEWAY_METRICS_PORT"
    }


@pytest.mark.parametrize("entry", [*PROCESSES, *MIGRATIONS], ids=lambda p: p.name)
def test_every_command_is_one_the_cli_runs(entry: Process | Migration) -> None:
    args = build_parser().parse_args(list(entry.args))
    assert callable(getattr(args, "run", None))


def _programs(data_dir: Path) -> dict[str, configparser.SectionProxy]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(supervisor_config(data_dir))
    return {
        section.removeprefix("program:"): parser[section]
        for section in parser.sections()
        if section.startswith("program:")
    }


def test_the_supervisor_runs_exactly_the_table(tmp_path: Path) -> None:
    programs = _programs(tmp_path)
    assert set(programs) == {p.name for p in PROCESSES}
    for entry in PROCESSES:
        shell, flag, script = shlex.split(programs[entry.name]["command"])
        assert (shell, flag) == ("/bin/sh", "-c")
        # the shell becomes the process (exec), its output going straight to its own file
        log = process_log(tmp_path, entry.name)
        assert shlex.split(script) == ["exec", *entry.command.split(), f">>{log}", "2>&1"]


def test_every_process_is_restarted_with_backoff_and_stopped_as_a_group(tmp_path: Path) -> None:
    for program in _programs(tmp_path).values():
        assert program["autorestart"] == "true"
        assert int(program["startsecs"]) > 0  # a quick exit is a failed start: backoff
        assert int(program["startretries"]) == START_RETRIES
        assert program["stopsignal"] == "TERM"
        assert program["stopasgroup"] == program["killasgroup"] == "true"


def test_the_gateway_starts_after_its_upstreams(tmp_path: Path) -> None:
    programs = _programs(tmp_path)
    gateway = int(programs["gateway"]["priority"])
    assert all(int(p["priority"]) < gateway for name, p in programs.items() if name != "gateway")


def test_a_percent_sign_in_the_data_folder_is_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "100%"
    assert "100%%" in supervisor_config(folder)
    assert "100%/" not in supervisor_config(folder)


def test_an_unknown_process_is_named_with_the_known_ones() -> None:
    assert process("orders-relay").args == ("orders", "relay")
    with pytest.raises(KeyError, match="known: gateway, orders-api"):
        process("order-relay")


def test_each_service_declares_its_processes_and_the_table_joins_them_in_order() -> None:
    assert [s.name for s in SERVICES] == ["orders", "payments"]
    assert PROCESSES[0].kind == "gateway"
    assert PROCESSES[1:] == tuple(p for s in SERVICES for p in s.processes)
    assert tuple(s.migration for s in SERVICES) == MIGRATIONS
    for service in SERVICES:
        assert sorted(p.kind for p in service.processes) == ["api", "consumer", "relay"]


def test_a_service_cannot_declare_another_services_process() -> None:
    orders, payments = SERVICES
    with pytest.raises(ValueError, match="payments-api is not a process of the orders service"):
        Service(
            "orders",
            "order_db",
            "order_outbox",
            "moves orders",
            (*orders.processes[:2], payments.processes[0]),
            orders.migration,
        )


def test_the_cli_composes_exactly_the_table_services() -> None:
    assert set(_COMPOSITIONS) == {s.name for s in SERVICES}
    # the parser's commands come from the table: every declared one parses (above), and a
    # process the table does not declare is refused
    with pytest.raises(SystemExit):
        build_parser().parse_args(["orders", "worker"])


def test_the_settings_default_to_the_table_ports() -> None:
    settings: dict[str | None, type[BaseSettings]] = {
        None: GatewaySettings,
        "orders": OrdersSettings,
        "payments": PaymentsSettings,
    }
    for entry in PROCESSES:
        fields = settings[entry.service].model_fields
        for setting, port in entry.ports.items():
            assert fields[setting.removeprefix("GOZON_").lower()].default == port, setting
