"""Benchmark: what a worker's event loop costs per database round trip, asyncio against uvloop.

The relays and consumers are all event-loop turns: at a low rate every batch is a handful of
round trips (BEGIN, a statement or two, COMMIT) with the process idle in between. This bench
starts a throwaway PostgreSQL and, in a child process per phase, does what such a batch does
`--batches` times: BEGIN, one `SELECT … FROM unnest(…)`, COMMIT on an asyncpg connection, then
sleeps `--gap-ms` (a low rate: one batch per gap), on asyncio's loop or on uvloop, alternating
(asyncio, uvloop, asyncio, …). Per phase it reports the child's CPU µs per batch (utime+stime
from /proc, the loop's startup excluded) and its system share.

    .venv/bin/python -m bench.event_loop [--batches 2000] [--gap-ms 5] [--rounds 3]

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys

from devstack import throwaway_postgres, workdir

STATEMENT = "SELECT x, x * 2 FROM unnest($1::bigint[]) AS x"


def _cpu() -> tuple[float, float]:
    times = os.times()
    return times.user, times.system


async def _batches(url: str, batches: int, gap: float) -> tuple[float, float]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for _ in range(50):  # warm: the prepared statement and the connection
            await conn.fetch(STATEMENT, [1, 2, 3])
        user0, sys0 = _cpu()
        for n in range(batches):
            async with conn.transaction():
                await conn.fetch(STATEMENT, [n, n + 1, n + 2])
            await asyncio.sleep(gap)
        user1, sys1 = _cpu()
    finally:
        await conn.close()
    return user1 - user0, sys1 - sys0


def child(loop: str, url: str, batches: int, gap: float) -> None:
    if loop == "uvloop":
        import uvloop

        user, system = uvloop.run(_batches(url, batches, gap))
    else:
        user, system = asyncio.run(_batches(url, batches, gap))
    print(f"{user} {system}")


def child_cpu(url: str, loop: str, batches: int, gap_ms: float) -> tuple[float, float]:
    """User and system CPU seconds of a child doing `batches` batches on `loop` against `url`."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.event_loop",
            "--batches",
            str(batches),
            "--gap-ms",
            str(gap_ms),
            "--child",
            loop,
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    user, system = map(float, out.stdout.split())
    return user, system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batches, args.gap_ms / 1000)
        return 0

    results: dict[str, list[tuple[float, float]]] = {"asyncio": [], "uvloop": []}
    with workdir("gozon-bench-loop-") as work, throwaway_postgres(work / "pg", ("bench",)) as pg:
        url = pg.url("bench", driver="postgresql")
        for _ in range(args.rounds):
            for loop in ("asyncio", "uvloop"):
                user, system = child_cpu(url, loop, args.batches, args.gap_ms)
                results[loop].append((user, system))
                print(f"  {loop}: {1e6 * (user + system) / args.batches:,.0f} µs/batch", flush=True)

    print(f"\n{args.batches} batches × {args.rounds} rounds, gap {args.gap_ms} ms, medians\n")
    print("| loop | CPU µs per batch (BEGIN, statement, COMMIT) | system share |")
    print("| --- | --- | --- |")
    for loop, runs in results.items():
        per = statistics.median(1e6 * (u + s) / args.batches for u, s in runs)
        share = statistics.median(s / (u + s) for u, s in runs)
        print(f"| {loop} | {per:,.0f} | {share:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
