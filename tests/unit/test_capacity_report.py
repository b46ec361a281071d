"""bench.capacity's report: what an order costs the platform leaves out the load generator and
the bench itself, which the CPU table still lists (issue 11's budget counts the platform)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from bench.capacity import (
    RateResult,
    _command_from,
    _replica_gozon,
    _venvs,
    cpu_table,
    pg_clients_delta,
    pg_clients_table,
    start_stack,
    summary_table,
)

from gozon.processes import PROCESSES


def _result() -> RateResult:
    return RateResult(
        rate=50,
        duration=60,
        warmup=10,
        load_before="0.1 0.1 0.1",
        completed_in_window=1000,
        window_s=20.0,
        cpu_s={"orders-api": 2.0, "postgresql": 3.0, "vegeta": 4.0, "bench (this script)": 1.0},
    )


def test_the_summary_counts_only_the_platform_per_order() -> None:
    row = summary_table([_result()]).splitlines()[-1]
    # 5 s of the platform's CPU over 1,000 orders; with vegeta and the bench it would be 10.0
    assert "| 5.0 |" in row
    assert "| 10.0 |" not in row


def test_the_cpu_table_lists_every_process_the_platform_and_the_total() -> None:
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in cpu_table([_result()], None).splitlines()[2:]
    }
    assert rows["vegeta"] == "4.00 (20%)"
    assert rows["platform (all but vegeta and this script)"] == "5.00 (25%)"
    assert rows["total"] == "10.00 (50%)"


def test_a_process_named_with_venv_runs_from_that_virtualenv(tmp_path: Path) -> None:
    other = tmp_path / "other-venv"
    (other / "bin").mkdir(parents=True)
    (other / "bin" / "gozon").write_text("")
    named = _venvs(f"orders-relay={other}")
    command = _command_from(dict(named))
    by_name = {p.name: command(p) for p in PROCESSES}
    assert by_name["orders-relay"] == f"{other.resolve()}/bin/gozon orders relay"
    assert by_name["payments-relay"] == "gozon payments relay"  # this tree's, from PATH
    # --replicas copies run from the same virtualenv as the process they copy
    assert _replica_gozon("orders-relay", dict(named)) == other.resolve() / "bin" / "gozon"
    assert _replica_gozon("payments-relay", dict(named)) == Path(sys.executable).parent / "gozon"


def test_venv_refuses_an_unknown_process_or_a_folder_without_gozon(tmp_path: Path) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="PROCESS=VIRTUALENV"):
        _venvs(f"orders-relays={tmp_path}")
    with pytest.raises(argparse.ArgumentTypeError, match="PROCESS=VIRTUALENV"):
        _venvs(f"orders-relay={tmp_path}")


def test_venv_is_refused_against_a_running_stack_before_anything_starts() -> None:
    args = argparse.Namespace(stack="running", venv=[("orders-relay", "/elsewhere/.venv")])
    with pytest.raises(SystemExit, match="--venv needs the bench's own stack"):
        start_stack(args)


def test_postgresql_is_split_by_client_from_the_backends_alive_at_both_ends() -> None:
    before = {
        10: ("payments-consumer", 1.0),
        11: ("payments-consumer", 2.0),
        12: ("orders-api", 5.0),
        13: ("orders-api", 1.0),
        15: ("orders-consumer", 1.0),
    }
    after = {
        10: ("payments-consumer", 1.5),
        11: ("payments-consumer", 3.0),
        12: ("orders-api", 5.25),
        # 13 ended, 14 started, and 15's pid was reused by another client: left out
        14: ("orders-api", 9.0),
        15: ("orders-relay", 9.0),
    }
    assert pg_clients_delta(before, after) == {"payments-consumer": 1.5, "orders-api": 0.25}


def test_the_postgresql_table_shows_each_client_and_the_rest() -> None:
    result = _result()  # postgresql 3.0 s over 1,000 orders in 20 s
    result.pg_clients_s = {"payments-consumer": 2.0, "orders-api": 0.5}
    lines = pg_clients_table([result]).splitlines()
    assert lines[2] == "| payments-consumer | 2.00 (10%) |"
    assert lines[3] == "| orders-api | 0.50 (2%) |"
    assert lines[4] == "| backends that came or went in the window | 0.50 (2%) |"
