"""Benchmark: the consumers' `fetch_max_wait_ms` — produce → consume latency and idle CPU.

With `fetch_min_bytes=1` the broker answers a fetch as soon as any record lands, so a long
maximum wait should cost no latency while saving the empty fetches an idle consumer makes
(one every `fetch_max_wait_ms` per broker). This measures both, for each value, alternating
the values (A, B, C, A, B, C, …) so the machine's load hits them alike:

- idle: a consumer (`gozon.messaging.kafka.new_consumer`, polled as the runner polls it) on a
  3-partition topic with no traffic for `--idle` seconds: its CPU (this process) and the
  broker's (its JVM, from /proc), in % of one core;
- latency: a record every 50 ms for `--seconds` seconds from an idempotent `acks=all`
  producer in another process; the time from just before `send` to the consumer's
  `getmany` returning it (one clock: both stamps are `time.time()` on this machine).

    .venv/bin/python -m bench.fetch_wait --waits 10,100,500

Starts its own throwaway Kafka; loopback only; bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import port_for

from bench.capacity import Watched
from gozon.messaging.kafka import new_consumer
from scripts.stack import Kafka, StackConfig, create_topics

PRODUCER = """
import asyncio, sys, time
from gozon.messaging.kafka import new_producer

async def main(bootstrap, topic, seconds):
    producer = new_producer(bootstrap, client_id="bench-fetch-wait")
    await producer.start()
    try:
        end = time.time() + seconds
        n = 0
        while time.time() < end:
            await producer.send_and_wait(topic, str(time.time()).encode(), key=str(n).encode())
            n += 1
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


async def one(
    bootstrap: str, wait_ms: int, args: argparse.Namespace, broker: Watched
) -> dict[str, float]:
    topic = f"bench.fetch.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, [topic], partitions=3)
    consumer = new_consumer(
        bootstrap,
        group_id=f"bench-{topic}",
        client_id="bench",
        topics=[topic],
        fetch_max_wait_ms=wait_ms,
    )
    await consumer.start()
    try:
        # wait for the assignment (the first getmany calls join the group)
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        cpu, kafka = time.process_time(), broker.snapshot()
        started = time.monotonic()
        while time.monotonic() - started < args.idle:
            await consumer.getmany(timeout_ms=200)  # as the runner polls
        elapsed = time.monotonic() - started
        idle_consumer = 100 * (time.process_time() - cpu) / elapsed
        idle_kafka = 100 * (broker.snapshot()["kafka"] - kafka["kafka"]) / elapsed

        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PRODUCER, bootstrap, topic, str(args.seconds)
        )
        latencies: list[float] = []
        while producer.returncode is None or not latencies:
            batches = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batches.values():
                latencies.extend(1000 * (now - float(r.value or b"0")) for r in records)
        # the producer is done: collect what is still in flight
        for _ in range(5):
            batches = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batches.values():
                latencies.extend(1000 * (now - float(r.value or b"0")) for r in records)
    finally:
        await consumer.stop()
    ordered = sorted(latencies)
    return {
        "idle_consumer_pct": idle_consumer,
        "idle_kafka_pct": idle_kafka,
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "records": len(ordered),
    }


async def run(args: argparse.Namespace, kafka: Kafka) -> None:
    broker = Watched({"kafka": (kafka.running_pid() or 0, False)})
    figures: dict[int, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for wait_ms in args.waits:
            result = await one(kafka.bootstrap, wait_ms, args, broker)
            figures.setdefault(wait_ms, []).append(result)
            print(f"fetch_max_wait_ms={wait_ms}: {result}", file=sys.stderr)
    load = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    print(f"\n`bench.fetch_wait`, {args.rounds} rounds (medians), load average {load}\n")
    print(
        "| fetch_max_wait_ms | produce → consume p50 ms | p99 ms "
        "| idle consumer, % of a core | idle broker, % of a core |"
    )
    print("| --- | --- | --- | --- | --- |")
    for wait_ms, results in figures.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"| {wait_ms} | {median('p50_ms'):.1f} | {median('p99_ms'):.1f} "
            f"| {median('idle_consumer_pct'):.1f} | {median('idle_kafka_pct'):.1f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--waits", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 500]
    )
    parser.add_argument("--idle", type=float, default=15, help="idle seconds per value")
    parser.add_argument("--seconds", type=float, default=10, help="traffic seconds per value")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="gozon-bench-"))
    kafka_port = port_for.select_random()
    kafka = Kafka(
        work / "kafka",
        kafka_port,
        port_for.select_random(exclude_ports=[kafka_port]),
        cache_dir=StackConfig.from_env().cache_dir,
    )
    try:
        kafka.start()
        asyncio.run(run(args, kafka))
        return 0
    finally:
        kafka.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
