"""bench.calls: the profiling switch its stack's processes get, and how a profile becomes calls
per order by library (a count that moves far less with the host than the CPU bench's)."""

from __future__ import annotations

import cProfile
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from bench.calls import PROFILING, Profile, calls_table, library


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("~", "C functions"),
        ("<frozen abc>", "abc"),
        ("/w/.venv/lib/python3.11/site-packages/aiokafka/protocol/types.py", "aiokafka"),
        ("/w/.venv/lib/python3.11/site-packages/typing_extensions.py", "typing_extensions"),
        ("/w/main/services/gozon/messaging/relay.py", "gozon.messaging"),
        ("/w/main/services/gozon/cli.py", "gozon.cli"),
        ("/usr/lib/python3.11/asyncio/tasks.py", "asyncio"),
        ("/usr/lib/python3.11/typing.py", "typing"),
        ("<string>", "other"),
    ],
)
def test_each_function_is_filed_under_its_library(filename: str, expected: str) -> None:
    assert library(filename) == expected


def _helper(values: list[int]) -> int:
    return len(values)


def test_a_profile_counts_every_call_by_library_and_by_function() -> None:
    profile = cProfile.Profile()
    profile.enable()
    for n in range(3):
        _helper([n])
    profile.disable()
    profile.create_stats()

    counted = Profile.of("relay", profile.stats)

    helper = next(name for name in counted.by_function if name.startswith("_helper ("))
    assert counted.by_function[helper] == 3
    assert counted.by_function["<built-in method builtins.len>"] == 3
    assert counted.by_library["C functions"] >= 3
    assert counted.calls == sum(counted.by_function.values())


def test_the_table_divides_by_the_orders_and_adds_the_processes_up() -> None:
    gateway = Profile("gateway", Counter({"aiohttp": 300, "C functions": 500}), Counter())
    relay = Profile("orders-relay", Counter({"aiokafka": 200}), Counter())

    table = calls_table([gateway, relay], orders=100)

    assert "| gateway | 8 | C functions 5, aiohttp 3 |" in table
    assert "| orders-relay | 2 | aiokafka 2 |" in table
    assert "| **all of them** | **10** | |" in table


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys

    def work():
        return sum(range(10))

    os.kill(os.getpid(), signal.SIGUSR2)   # on
    for _ in range(5):
        work()
    os.kill(os.getpid(), signal.SIGUSR2)   # off: written
    print(os.getpid())
    """
)


def _python(env: dict[str, str], script: str = SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sigusr2_starts_and_stops_a_profile_written_to_the_folder(tmp_path: Path) -> None:
    import pstats

    done = _python({"PYTHONPATH": str(PROFILING), "GOZON_BENCH_PROFILE_DIR": str(tmp_path)})

    assert done.returncode == 0, done.stderr
    written = tmp_path / f"{done.stdout.strip()}.prof"
    assert [path.name for path in tmp_path.iterdir()] == [written.name]  # no half-written name
    stats = pstats.Stats(str(written)).stats  # type: ignore[attr-defined]
    calls = {name: row[1] for (_, _, name), row in stats.items()}
    assert calls["work"] == 5


def test_without_the_folder_nothing_is_installed(tmp_path: Path) -> None:
    done = _python(
        {"PYTHONPATH": str(PROFILING), "GOZON_BENCH_PROFILE_DIR": ""},
        "import signal; print(signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL)",
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_the_sitecustomize_it_hides_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['HIDDEN_RAN'] = 'yes'\n")

    done = _python(
        {"PYTHONPATH": os.pathsep.join([str(PROFILING), str(tmp_path)])},
        "import os, sitecustomize; print(os.environ.get('HIDDEN_RAN'), sitecustomize.__file__)",
    )

    assert done.returncode == 0, done.stderr
    ran, loaded = done.stdout.split()
    assert ran == "yes"
    assert Path(loaded).parent == PROFILING
