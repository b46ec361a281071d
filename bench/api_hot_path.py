"""Benchmark: the orders API's POST /api/orders, this tree against another commit, same run.

Starts its own throwaway PostgreSQL, then alternates phases (ABAB…) of a real `gozon orders
api` from this tree ("new") and from `--before` (default `main`, exported with `git archive`
and put first on PYTHONPATH, same virtualenv: "old"), each restarted for its phase. Each phase
is vegeta at its maximum rate (`-rate=0`, `--workers` requests in flight, every request a new
order) against the API directly; the API's CPU time is read from /proc/PID/stat before and
after. Prints each phase, the medians per tree and the ratios, and the load average.

    scripts/install-vegeta
    .venv/bin/python -m bench.api_hot_path [--before main] [--workers 16] [--phase-seconds 8]

Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import port_for

from bench.relay import MIGRATIONS
from scripts.processes import GozonProcess
from scripts.stack import Postgres

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def vegeta() -> str:
    out = subprocess.run(
        [str(ROOT / "scripts" / "install-vegeta")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def attack(binary: str, url: str, workers: int, seconds: float, work: Path) -> dict[str, float]:
    target = work / "target.txt"
    body = work / "body.json"
    body.write_text(json.dumps({"amount": 10.5, "description": "bench"}))
    target.write_text(
        f"POST {url}/api/orders\nContent-Type: application/json\nX-User-Id: bench-user\n@{body}\n"
    )
    attacked = subprocess.run(
        [
            binary,
            "attack",
            f"-targets={target}",
            "-rate=0",
            f"-max-workers={workers}",
            f"-workers={workers}",
            f"-duration={seconds}s",
            "-keepalive=true",
        ],
        check=True,
        capture_output=True,
    )
    report = subprocess.run(
        [binary, "report", "-type=json"], input=attacked.stdout, check=True, capture_output=True
    )
    result = json.loads(report.stdout)
    ok = result["status_codes"].get("201", 0)
    return {
        "ok": ok,
        "requests": result["requests"],
        "p50_ms": result["latencies"]["50th"] / 1e6,
        "p99_ms": result["latencies"]["99th"] / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="the commit to compare against")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--phase-seconds", type=float, default=8)
    parser.add_argument("--phases", type=int, default=3, help="phases per tree (ABAB…)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    binary = vegeta()

    work = Path(tempfile.mkdtemp(prefix="gozon-bench-"))
    work.chmod(0o755)
    old_tree = work / "before"
    old_tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", args.before, "services"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    pg = Postgres(work / "pg", port_for.select_random(), durable=True, databases=("order_db",))
    api_port = port_for.select_random()
    base = {
        "GOZON_ORDERS_DATABASE_URL": pg.url("order_db"),
        "GOZON_ORDERS_API_PORT": str(api_port),
        "GOZON_LOG_LEVEL": "INFO",  # as deployed: one line per order
    }
    trees = {
        "old": {**base, "PYTHONPATH": str(old_tree / "services")},
        "new": base,
    }
    url = f"http://127.0.0.1:{api_port}"

    def measure(name: str) -> dict[str, float]:
        api = GozonProcess(
            ["orders", "api"], env=trees[name], log=work / f"{name}.log", health_url=url
        )
        api.start(ready=True)
        try:
            assert api.process is not None
            attack(binary, url, args.workers, 1, work)  # warm-up
            cpu0, t0 = cpu_seconds(api.process.pid), time.monotonic()
            result = attack(binary, url, args.workers, args.phase_seconds, work)
            cpu1, t1 = cpu_seconds(api.process.pid), time.monotonic()
        finally:
            api.stop()
        result["per_s"] = result["ok"] / args.phase_seconds
        result["cpu_ms"] = 1000 * (cpu1 - cpu0) / max(result["ok"], 1)
        result["wall_s"] = t1 - t0
        print(
            f"{name}: {result['per_s']:.0f}/s ({result['ok']:.0f} of {result['requests']:.0f} "
            f"201), p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
            f"CPU {result['cpu_ms']:.2f} ms/POST",
            flush=True,
        )
        return result

    try:
        pg.start()
        from gozon.core.migrations import upgrade

        upgrade(MIGRATIONS, pg.url("order_db"))
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for _ in range(args.phases):
            for name in ("old", "new"):
                runs[name].append(measure(name))

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[name])

        print(
            f"POST /api/orders, {args.workers} in flight, {args.phases}×{args.phase_seconds:g} s "
            f"per tree; old = {args.before}, new = this tree (medians):"
        )
        for name in ("old", "new"):
            print(
                f"  {name}: {med(name, 'per_s'):.0f}/s, CPU {med(name, 'cpu_ms'):.2f} ms/POST, "
                f"p50 {med(name, 'p50_ms'):.1f} ms, p99 {med(name, 'p99_ms'):.1f} ms"
            )
        print(
            f"  new/old throughput {med('new', 'per_s') / med('old', 'per_s'):.2f}×, "
            f"CPU per POST {med('new', 'cpu_ms') / med('old', 'cpu_ms'):.2f}×"
        )
        print("  " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        return 0
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
