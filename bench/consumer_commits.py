"""Benchmark: the consumer runner's offset commits — CPU per event at a low fixed rate.

At a low rate every fetched batch is one message, so a commit after every batch costs one
OffsetCommit per message (a round trip for the consumer; a request and a __consumer_offsets
write for the broker). `ConsumerRunner(commit_interval=…)` commits the done offsets together
at most every interval instead (0 = after every batch, as before). For each interval,
alternating (A, B, C, A, B, C, …) so the machine's load hits them alike:

- a `ConsumerRunner` in this process on a fresh 3-partition topic (`new_consumer`, as the
  workers make it), with a handler that records nothing (no database: the commit's share is
  what differs, so it is measured alone);
- a producer in another process sends `--rate` records/s for `--seconds` seconds (open loop,
  idempotent, `acks=all`), each its own batch at that rate;
- from the producer's start until every record is handled and the runner has stopped (its
  last commit included): this process's CPU (the consumer) and the broker JVM's CPU (from
  /proc), per record, and the OffsetCommit requests the runner made.

    .venv/bin/python -m bench.consumer_commits --intervals 0,100,250,1000 --rounds 3

Starts its own throwaway Kafka; loopback only; bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import port_for
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from bench.capacity import Watched
from gozon.messaging.consumer import ConsumerRunner, Delivery, Outcome
from gozon.messaging.kafka import new_consumer, new_producer
from scripts.stack import Kafka, StackConfig, create_topics

PRODUCER = """
import asyncio, sys, time
from gozon.messaging.kafka import new_producer

async def main(bootstrap, topic, rate, seconds):
    producer = new_producer(bootstrap, client_id="bench-commits")
    await producer.start()
    try:
        start, n = time.monotonic(), 0
        while n < rate * seconds:
            await producer.send_and_wait(topic, b"{}", key=str(n).encode())
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    finally:
        await producer.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
"""


class Empty(BaseModel):
    pass


async def one(
    bootstrap: str,
    interval_ms: int,
    args: argparse.Namespace,
    broker: Watched,
    dlq: AIOKafkaProducer,
) -> dict[str, float]:
    topic = f"bench.commits.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, [topic], partitions=3)
    consumer = new_consumer(bootstrap, group_id=f"bench-{topic}", client_id="bench")
    expected = round(args.rate * args.seconds)
    handled = [0]
    all_handled = asyncio.Event()

    async def handler(batch: Sequence[Delivery[Empty]]) -> Sequence[Outcome]:
        handled[0] += len(batch)
        if handled[0] >= expected:
            all_handled.set()
        return ["processed"] * len(batch)

    runner = ConsumerRunner(
        consumer=consumer,
        producer=dlq,  # no dead letters here
        topic=topic,
        schema=Empty,
        handler=handler,
        commit_interval=interval_ms / 1000,
    )
    commits = [0]
    commit = consumer.commit

    async def counted(offsets: Any = None) -> None:
        commits[0] += 1
        await commit(offsets)

    consumer.commit = counted
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.sleep(3)  # the group joined and settled
        assert consumer.assignment(), "no partitions assigned after 3 s"
        commits[0] = 0
        cpu, kafka = time.process_time(), broker.snapshot()["kafka"]
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PRODUCER, bootstrap, topic, str(args.rate), str(args.seconds)
        )
        await producer.wait()
        await all_handled.wait()
        stop.set()
        await task
        consumer_s = time.process_time() - cpu
        kafka_s = broker.snapshot()["kafka"] - kafka
    finally:
        stop.set()
        await asyncio.wait([task])
        await consumer.stop()
    return {
        "consumer_ms": 1000 * consumer_s / expected,
        "kafka_ms": 1000 * kafka_s / expected,
        "commits_per_event": commits[0] / expected,
        "events": handled[0],
    }


async def run(args: argparse.Namespace, kafka: Kafka) -> None:
    broker = Watched({"kafka": (kafka.running_pid() or 0, False)})
    figures: dict[int, list[dict[str, float]]] = {}
    dlq = new_producer(kafka.bootstrap, client_id="bench-dlq")
    await dlq.start()
    try:
        # warm-up, not counted: the broker's JIT and the client's first connections
        warm = argparse.Namespace(**{**vars(args), "seconds": 5})
        for interval_ms in args.intervals:
            await one(kafka.bootstrap, interval_ms, warm, broker, dlq)
        for _ in range(args.rounds):
            for interval_ms in args.intervals:
                result = await one(kafka.bootstrap, interval_ms, args, broker, dlq)
                figures.setdefault(interval_ms, []).append(result)
                print(f"commit_interval_ms={interval_ms}: {result}", file=sys.stderr)
    finally:
        await dlq.stop()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n`bench.consumer_commits`, {args.rate:g} events/s for {args.seconds:g} s, "
        f"{args.rounds} rounds (medians), load average {load}\n"
    )
    print(
        "| commit interval ms | OffsetCommits per event | consumer CPU ms/event "
        "| broker CPU ms/event | both |"
    )
    print("| --- | --- | --- | --- | --- |")
    for interval_ms, results in figures.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        both = statistics.median(r["consumer_ms"] + r["kafka_ms"] for r in results)
        label = f"{interval_ms} (after every batch)" if interval_ms == 0 else str(interval_ms)
        print(
            f"| {label} | {median('commits_per_event'):.3f} | {median('consumer_ms'):.3f} "
            f"| {median('kafka_ms'):.3f} | {both:.3f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--intervals", type=lambda s: [int(x) for x in s.split(",")], default=[0, 250]
    )
    parser.add_argument("--rate", type=float, default=50, help="records per second")
    parser.add_argument("--seconds", type=float, default=30, help="seconds of traffic per run")
    parser.add_argument("--rounds", type=int, default=3)
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
