"""A worker's memory of its crashes (gozon.core.crashloop): crashes in a row back off longer
each time, a healthy run or a clean stop starts the count again, and the gauge says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gozon.core import crashloop
from gozon.core.crashloop import CrashMemory, backoff_s


def in_a_row() -> float | None:
    return REGISTRY.get_sample_value("gozon_process_crashes_in_a_row")


def test_the_backoff_doubles_from_one_second_up_to_five_minutes() -> None:
    assert [backoff_s(n) for n in (0, 1, 2, 3, 4, 10, 50)] == [0, 1, 2, 4, 8, 300, 300]


def test_crashes_soon_after_start_count_in_a_row_and_back_off_longer(tmp_path: Path) -> None:
    for expected in range(4):
        memory = CrashMemory.load(tmp_path, "payments-consumer")
        assert memory.crashes == expected
        assert memory.backoff_s == backoff_s(expected)
        assert in_a_row() == expected
        memory.crashed(RuntimeError("the same message, again"))
    state = json.loads((tmp_path / "payments-consumer.json").read_text())
    assert state["crashes"] == 4
    assert "the same message, again" in state["last_error"]
    assert CrashMemory.load(tmp_path, "payments-consumer").last_error == state["last_error"]


def test_a_crash_after_a_healthy_run_is_a_first_one_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        CrashMemory.load(tmp_path, "orders-relay").crashed(RuntimeError("x"))
    memory = CrashMemory.load(tmp_path, "orders-relay")
    assert memory.crashes == 3
    monkeypatch.setattr(crashloop, "HEALTHY_AFTER_S", 0.0)  # it has now run long enough
    assert in_a_row() == 0
    memory.crashed(RuntimeError("something else, much later"))
    assert CrashMemory.load(tmp_path, "orders-relay").crashes == 1


def test_a_clean_stop_forgets_the_crashes(tmp_path: Path) -> None:
    CrashMemory.load(tmp_path, "orders-consumer").crashed(RuntimeError("x"))
    memory = CrashMemory.load(tmp_path, "orders-consumer")
    assert memory.crashes == 1
    memory.stopped_cleanly()
    assert CrashMemory.load(tmp_path, "orders-consumer").crashes == 0


def test_without_a_state_dir_nothing_is_remembered() -> None:
    memory = CrashMemory.load(None, "orders-consumer")
    memory.crashed(RuntimeError("x"))
    assert CrashMemory.load(None, "orders-consumer").crashes == 0
    assert in_a_row() == 0
