"""bench.capacity's report: what an order costs the platform leaves out the load generator and
the bench itself, which the CPU table still lists (issue 11's budget counts the platform)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from bench.capacity import (
    YARDSTICK,
    RateResult,
    _command_from,
    _replica_gozon,
    _venvs,
    cpu_model,
    cpu_table,
    host_seconds,
    host_shares,
    host_table,
    jit_seconds,
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


def test_the_platform_is_weighed_against_vegeta_only_where_nothing_was_shed() -> None:
    clean = _result()
    clean.vegeta = {"status_codes": {"201": 1000}}
    shed = _result()
    shed.vegeta = {"status_codes": {"201": 1000, "503": 7}}
    table = cpu_table([clean, shed], {"vegeta": 0.0})
    row = next(line for line in table.splitlines() if line.startswith(f"| {YARDSTICK} |"))
    # 5 s of the platform against vegeta's 4 s; the run that shed shows nothing; idle has none
    assert [cell.strip() for cell in row.split("|")[2:-1]] == ["–", "1.2", "–"]


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


def _thread(proc: Path, pid: int, tid: int, comm: str, utime: int, stime: int) -> None:
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    (task / "comm").write_text(comm + "\n")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    (task / "stat").write_text(f"{tid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20\n")


def test_the_jit_is_the_jvms_compiler_threads_only(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    _thread(tmp_path, 7, 8, "C2 CompilerThre", 3 * ticks, ticks)
    _thread(tmp_path, 7, 9, "C1 CompilerThre", ticks, 0)
    _thread(tmp_path, 7, 10, "data-plane-kafk", 50 * ticks, 0)  # serving requests: not counted
    _thread(tmp_path, 7, 11, "a (b) C2 Compil", 50 * ticks, 0)  # a name is matched from its start
    assert jit_seconds(7, proc=tmp_path) == 5.0
    assert jit_seconds(12, proc=tmp_path) == 0.0  # no such process


def test_kafkas_jit_is_a_row_under_kafka_not_another_process() -> None:
    result = _result()  # the platform 5.0 s over 1,000 orders in 20 s
    result.cpu_s = {"kafka": 2.0, **result.cpu_s}
    result.kafka_jit_s = 1.5
    lines = cpu_table([result], {"kafka": 1.0}, idle_jit_pct=0.25).splitlines()
    names = [line.split("|")[1].strip() for line in lines[2:]]
    assert names[names.index("kafka") + 1] == "kafka: of which its JIT compiler threads"
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:]}
    assert [cell.strip() for cell in rows["kafka: of which its JIT compiler threads"]] == [
        "0.2",
        "1.50 (8%)",
    ]
    assert names.count("kafka: of which its JIT compiler threads") == 1
    # counted once, in kafka's row: the platform is 7.0 s, not 8.5; idle 1.0%, not 1.25
    assert [cell.strip() for cell in rows["platform (all but vegeta and this script)"]] == [
        "1.0",
        "7.00 (35%)",
    ]
    assert rows["total"][0].strip() == "1.0"


def test_the_machine_is_read_by_state_and_shown_as_shares_of_its_time(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  {6 * ticks} 0 {2 * ticks} {ticks} 0 0 0 {ticks} 0 0\ncpu0 1 2 3\n")
    assert host_seconds(stat) == {
        "user": 6.0,
        "nice": 0.0,
        "system": 2.0,
        "idle": 1.0,
        "iowait": 0.0,
        "irq": 0.0,
        "softirq": 0.0,
        "steal": 1.0,
    }
    result = _result()
    result.host_s = host_seconds(stat)
    assert host_shares(result.host_s) == {"busy": 80.0, "iowait": 0.0, "steal": 10.0, "idle": 10.0}
    lines = host_table([result]).splitlines()
    assert lines[2:] == [
        "| busy | 80.0 |",
        "| iowait | 0.0 |",
        "| steal | 10.0 |",
        "| idle | 10.0 |",
    ]
    assert host_shares({}) == {}


def test_the_header_names_the_processor_as_the_first_core_describes_it(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\ncpu MHz\t\t: 1999.9\n"
        "cache size\t: 1024 KB\n\nprocessor\t: 1\nmodel name\t: Other CPU\n"
    )
    assert cpu_model(cpuinfo) == "Some CPU @ 2.0GHz, cache 1024 KB, 2000 MHz"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")  # no cache or clock given
    assert cpu_model(cpuinfo) == "Some CPU"
