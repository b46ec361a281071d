"""Benchmark: the Python work each order costs every process, counted rather than timed.

`bench.capacity` times what an order costs in CPU, and its figures move with the host: main
cost 27.6 and then 20.1 ms per order at 50/s in two runs ten minutes apart on one machine
(docs/benchmarks.md, "Comparing runs"). A change that saves a few per cent is lost in that. This
bench counts instead: how many function calls (Python functions and the C functions they
call, as cProfile counts them) each of the platform's Python processes makes per order, and
in which library. A count does not depend on the host's speed directly, only on how often two
messages happen to share a batch (and on what the timers do in the window): in five runs the
gateway's and the orders API's counts stayed within 1%, the relays' and consumers' moved by
up to 12%. So a change to the front door shows in one run each on any machine; one to a
relay or a consumer needs several runs, or to be larger than that.

It starts its own stack exactly as `bench.capacity` does, with `bench/profiling` first on
PYTHONPATH (its `sitecustomize` gives every process a SIGUSR2 profiling switch), funds the
users, runs an unreported warm-up at the rate (pools filled, statements prepared), waits until
every order is final, switches the profiles on, lets vegeta offer `--rate` orders/s for
`--duration` seconds, waits until every order of the attack is final, and switches them off.
Every call any process made in between is divided by the orders of the attack: all of them
were created and finished inside the window, and nothing else ran.

Profiling slows every process, so no CPU figure is reported; the rate (50/s by default) is
one the platform keeps up with while profiled, and at it every message is a batch of one, the
costliest case per order. At a higher rate batches grow and the counts per order fall.

    .venv/bin/python -m bench.calls                          # 50/s for 30 s
    .venv/bin/python -m bench.calls --top 15                 # and each process's top functions
    .venv/bin/python -m bench.calls --venv orders-relay=../other/.venv   # another tree's relay
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.capacity import (
    FINAL,
    Stack,
    _venvs,
    cpu_model,
    fund,
    none_new,
    offer,
    start_stack,
    stop_stack,
    warm_up,
)
from gozon.processes import PROCESSES

PROFILING = Path(__file__).resolve().parent / "profiling"
FunctionKey = tuple[str, int, str]  # pstats: (file, line, function)


def library(filename: str) -> str:
    """The library a profiled function belongs to, from its file: a package under
    site-packages, `gozon.<package>`, a standard-library module, or the C functions cProfile
    files under "~" (builtins and the methods of C types: `len`, `dict.get`, a socket's
    send, …)."""
    if filename == "~":
        return "C functions"
    if match := re.match(r"<frozen (\w+)", filename):
        return match.group(1)
    path = filename.replace("\\", "/")
    if "/site-packages/" in path:
        top = path.split("/site-packages/", 1)[1].split("/", 1)[0]
        return top.removesuffix(".py")
    if match := re.search(r"/(gozon)/(\w+)(/|\.py$)", path):
        return f"gozon.{match.group(2)}"
    if match := re.search(r"/python3\.\d+/(\w+)", path):
        return match.group(1)
    return "other"


@dataclass
class Profile:
    """One process's calls in the window: by library and by function."""

    process: str
    by_library: Counter[str]
    by_function: Counter[str]

    @property
    def calls(self) -> int:
        return sum(self.by_library.values())

    @classmethod
    def of(cls, process: str, stats: Mapping[FunctionKey, tuple[Any, ...]]) -> Profile:
        by_library: Counter[str] = Counter()
        by_function: Counter[str] = Counter()
        for (filename, line, name), (_, calls, *_rest) in stats.items():
            by_library[library(filename)] += calls
            where = "" if filename == "~" else f" ({_short(filename)}:{line})"
            by_function[f"{name}{where}"] += calls
        return cls(process, by_library, by_function)


def _short(filename: str) -> str:
    path = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/services/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/", 1)[-1]


def calls_table(profiles: Iterable[Profile], orders: int, libraries: int = 6) -> str:
    """Calls per order of each process, and the libraries that make most of them."""
    rows = [
        "| process | calls per order | the libraries with most of them (calls per order) |",
        "| --- | ---: | --- |",
    ]
    everything = 0
    for profile in profiles:
        everything += profile.calls
        most = profile.by_library.most_common(libraries)
        top = ", ".join(f"{name} {count / orders:.0f}" for name, count in most)
        rows.append(f"| {profile.process} | {profile.calls / orders:.0f} | {top} |")
    rows.append(f"| **all of them** | **{everything / orders:.0f}** | |")
    return "\n".join(rows)


def top_functions(profile: Profile, orders: int, count: int) -> str:
    lines = [f"{profile.process}: the {count} functions called most, calls per order"]
    for name, calls in profile.by_function.most_common(count):
        lines.append(f"  {calls / orders:8.1f}  {name}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


def _switch(pids: Mapping[str, int]) -> None:
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)


async def _all_final(orders: asyncpg.Connection, seconds: float) -> None:
    if not await none_new(orders, seconds):
        raise SystemExit(f"orders still NEW after {seconds:.0f} s: the platform fell behind")


async def measure(
    stack: Stack, args: argparse.Namespace, folder: Path
) -> tuple[int, dict[str, dict[FunctionKey, tuple[Any, ...]]]]:
    users = [f"calls-user-{uuid.uuid4().hex[:6]}-{n}" for n in range(args.users)]
    await fund(stack.gateway, users)
    await warm_up(stack, users, args.rate, args.warm_seconds)
    pids = {p.name: stack.watched.pids[p.name][0] for p in PROCESSES}
    prefix = f"calls-{uuid.uuid4().hex[:8]}"
    orders = await asyncpg.connect(stack.orders_db)
    try:
        await _all_final(orders, args.drain)
        await asyncio.sleep(2)  # the warm-up's last offset commits and notifications
        _switch(pids)
        await offer(stack, users, args.rate, args.duration, prefix)
        await _all_final(orders, args.drain)
        await asyncio.sleep(2)  # the same tail as before the window
        _switch(pids)
        finished, created = await orders.fetchrow(
            "SELECT count(*) FILTER (WHERE status = ANY($2)), count(*) "
            "FROM orders WHERE description LIKE $1",
            f"{prefix}-%",
            list(FINAL),
        )
    finally:
        await orders.close()
    if finished != created or finished == 0:
        raise SystemExit(f"{created} orders created, {finished} final: nothing to divide by")
    stats: dict[str, dict[FunctionKey, tuple[Any, ...]]] = {}
    for name, pid in pids.items():
        path = folder / f"{pid}.prof"
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit(f"{name} (pid {pid}) wrote no profile to {folder}")
        stats[name] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    return finished, stats


def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="gozon-calls-"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROFILING), os.environ.get("PYTHONPATH", "")) if p
    )
    os.environ["GOZON_BENCH_PROFILE_DIR"] = str(folder)
    stack_args = argparse.Namespace(
        stack="own", partitions=args.partitions, venv=args.venv, replicas=[]
    )
    try:
        stack = start_stack(stack_args)
        try:
            orders, stats = asyncio.run(measure(stack, args, folder))
        finally:
            stop_stack(stack, args.keep)
    finally:
        if args.keep:
            print(f"the profiles (pstats, one per pid): {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    profiles = [Profile.of(name, per_function) for name, per_function in stats.items()]
    # under one call per order: no part in an order (the payments API), left out of the table
    profiles = [p for p in profiles if p.calls >= orders]
    print(
        f"\n`bench.calls` {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores ({cpu_model()}), {args.rate}/s for {args.duration} s, "
        f"{orders} orders, partitions {args.partitions}, Python {sys.version.split()[0]}"
        + "".join(f", {name} from {venv}" for name, venv in args.venv)
        + "\n"
    )
    print(calls_table(profiles, orders))
    if args.top:
        for profile in profiles:
            print()
            print(top_functions(profile, orders, args.top))
    if args.json:
        figures = {
            "orders": orders,
            "rate": args.rate,
            "calls_per_order": {p.process: p.calls / orders for p in profiles},
            "by_library": {
                p.process: {k: v / orders for k, v in p.by_library.most_common()} for p in profiles
            },
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=50, help="orders/s offered")
    parser.add_argument("--duration", type=int, default=30, help="seconds of the counted attack")
    parser.add_argument(
        "--warm-seconds", type=int, default=20, help="unreported attack at the rate first"
    )
    parser.add_argument("--drain", type=int, default=60, help="seconds to wait for finals")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=3, help="topic partitions")
    parser.add_argument("--top", type=int, default=0, help="also list each process's top N")
    parser.add_argument(
        "--venv",
        type=_venvs,
        default=[],
        help="run these processes from another virtualenv, e.g. orders-relay=../other/.venv",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the stack running and the profiles on disk"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.rate < 1 or args.duration < 1:
        parser.error("--rate and --duration must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
