"""Benchmark: how fast the gateway answers 503 when an upstream is down.

    .venv/bin/python -m bench.dead_upstream [--requests 200]

Starts a real `gozon gateway` whose upstreams point at a loopback port nobody listens on, then
sends `--requests` GETs one after another and prints the median, p90, p99 and maximum time to
the 503 (the first few are refused connections, retried once; the rest meet the open circuit
breaker). The functional tests check that the answer is a 503 problem; this figure (target:
well under 100 ms at the median) lives here, because a timed assertion fails on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.error
import urllib.request

import port_for

from bench.gateway import USER, gateway_process
from devstack import workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with workdir("gozon-bench-") as work:
        gateway = gateway_process(work, f"http://127.0.0.1:{port_for.select_random()}")
        gateway.start()  # live (not ready: its upstreams are down, on purpose)
        try:
            latencies_ms: list[float] = []
            statuses: dict[int, int] = {}
            for _ in range(args.requests):
                request = urllib.request.Request(  # noqa: S310 (loopback)
                    f"{gateway.health_url}/api/orders", headers=USER
                )
                started = time.perf_counter()
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                        status = int(answer.status)
                except urllib.error.HTTPError as exc:
                    status = exc.code
                latencies_ms.append((time.perf_counter() - started) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            gateway.stop()
    ordered = sorted(latencies_ms)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    print(f"answers: {statuses}")
    print(
        f"503 latency over {len(ordered)} requests: median {statistics.median(ordered):.1f} ms, "
        f"p90 {pct(0.90):.1f} ms, p99 {pct(0.99):.1f} ms, max {ordered[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
