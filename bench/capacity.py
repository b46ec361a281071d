"""Benchmark: the platform's capacity, end to end, and what each order costs in CPU.

vegeta (an open-loop generator in Go, `scripts/install-vegeta`) offers POST /api/orders
through the gateway at fixed rates, every request a new order (its own Idempotency-Key) of
one of many users who were funded beforehand. For each rate the bench prints:

- what vegeta saw: requests sent per second, status codes (503s apart), latencies;
- what the platform completed, from order_db's own clock: orders that reached their final
  status (FINISHED/CANCELLED) per second inside the steady window (the attack minus its first
  `--warmup` seconds), and order → final p50/p95/p99 (`created_at` → final `updated_at`) of
  the orders created in that window;
- the backlog each second: orders still NEW, order_outbox and payment_outbox rows PENDING;
- a CPU budget: for every process (the seven gozon processes, PostgreSQL with all its
  backends, Kafka's JVM, supervisord, vegeta, this script) the CPU it used in the steady
  window, from /proc/PID/stat (utime+stime, plus cutime+cstime and the live descendants, so
  that a PostgreSQL backend that exits mid-window still counts), per completed order. The
  summary's "platform CPU ms/order" leaves out vegeta and this script: the load generator
  and the observer are not what an order costs the platform (the CPU table lists them, and
  a total with them);
- PostgreSQL's CPU split by the client each backend serves (its `application_name`: the
  orders API, each relay and consumer, the outbox notifiers), from each backend's own
  /proc/PID/stat at the window's two ends; backends that came or went inside the window are
  one row (they are in the postgresql total, not in a client's).
- Of Kafka's CPU, its JIT compiler threads' (HotSpot's "C1/C2 CompilerThread"s, from their own
  /proc stat): the part that is the broker compiling its hot paths, not serving requests. It
  is near zero on a broker that has run for a while.
- The machine in each window, from /proc/stat: the share of its cores' time busy, waiting for
  the disk, stolen by the hypervisor (another guest ran on them) and idle. A window with steal
  ran on less than the machine's cores; one with idle left was not short of CPU.
- The host's price of a wake-up, after the last rate (`--wake-batches`, 0: none): CPU µs of a
  worker-like batch (BEGIN, a statement, COMMIT on uvloop and asyncpg, against the stack's
  PostgreSQL) done once every 20 ms, as each process works at 50 orders/s (`bench.event_loop`).
  The same code cost 12 ms per order at 50/s on a host where it was ~210 µs and 25 ms where it
  was ~900 (docs/benchmarks.md, "Comparing runs"): it says which host a run had.

After a warm-up (`--warm-rate` × `--warm-seconds`, 9,000 orders by default: a running
platform is measured, not one whose JVM is still compiling), before the first rate, it
measures the idle platform: each process's CPU over `--idle` seconds with no traffic, in %
of one core.

    .venv/bin/python -m bench.capacity --rates 50,100,300 --duration 60
    .venv/bin/python -m bench.capacity --stack running --rates 50     # against `make up`

By default the bench starts its own stack exactly as `make up` does (PostgreSQL, Kafka, the
seven processes under supervisord, each logging to its own file) in a temporary folder on
free ports, and stops it at the end. `--stack running` measures the stack the GOZON_*
variables point at (by default `make up`'s ports and `.gozon` folder). `--venv
orders-relay=../other/.venv` runs a process from another virtualenv, for a paired A/B in one
run (the two relays, one from each interpreter or tree). Markdown tables go to
stdout, ready for docs/benchmarks.md; `--json FILE` also writes every figure as JSON.

Loopback only; every wait is bounded (`--drain` seconds after each attack).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.event_loop import child_cpu
from devstack import Platform, StackConfig, free_ports, migrate_and_create_topics, stack_env
from gozon.processes import PROCESSES, Process
from tests.faults.load import vegeta

TICK = os.sysconf("SC_CLK_TCK")
FINAL = ("FINISHED", "CANCELLED")


# --------------------------------------------------------------------------- CPU accounting


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own utime+stime, reaped children's cutime+cstime) in clock ticks."""
    return _stat_file(Path(f"/proc/{pid}/stat"))


def _stat_file(path: Path) -> tuple[int, int, int] | None:
    """`_stat` of a process's or a thread's stat file; None when it has ended."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    # after "pid (comm) ": state ppid … utime(14) stime(15) cutime(16) cstime(17), 1-based
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _process_table() -> dict[int, tuple[int, int, int]]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def _tree_ticks(pid: int, table: Mapping[int, tuple[int, int, int]], own_only: bool) -> int:
    """CPU of `pid` and everything under it: its own time, its reaped children's, and its live
    descendants' (a child that exits moves from the last term to the second, so the sum is
    consistent from one snapshot to the next)."""
    if pid not in table:
        return 0
    _, own, reaped = table[pid]
    if own_only:
        return own
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(child)
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        _, own, reaped = table[current]
        total += own + reaped
        stack.extend(children.get(current, ()))
    return total


@dataclass
class Watched:
    """The processes whose CPU is counted: name → (pid, count only its own time)."""

    pids: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        """CPU seconds used so far by each watched process (with its descendants)."""
        table = _process_table()
        return {
            name: _tree_ticks(pid, table, own_only) / TICK
            for name, (pid, own_only) in self.pids.items()
        }


VEGETA = "vegeta"
BENCH = "bench (this script)"
NOT_PLATFORM = frozenset({VEGETA, BENCH})
"""The load generator and this script: listed in the CPU table, but not the platform's cost (the
CPU budget per order counts the platform's processes only)."""
KAFKA_JIT = "kafka: of which its JIT compiler threads"
"""The CPU table's row for the part of Kafka's figure that `jit_seconds` reads."""


PG_CLIENTS = """
SELECT pid, coalesce(nullif(application_name, ''), backend_type) AS client
FROM pg_stat_activity
"""
"""Every PostgreSQL process (the cluster's, whichever database): the client it serves, by the
`application_name` the platform's connections set, or the server's own process type."""


async def pg_backends(conn: asyncpg.Connection) -> dict[int, tuple[str, float]]:
    """pid → (client, CPU seconds used so far by that backend alone)."""
    ticks = {}
    for row in await conn.fetch(PG_CLIENTS):
        stat = _stat(row["pid"])
        if stat is not None:
            ticks[row["pid"]] = (row["client"], stat[1] / TICK)
    return ticks


def pg_clients_delta(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[str, float]:
    """PostgreSQL's CPU in the window by client: the backends alive at both ends, summed by
    client, most first. A backend that started or ended inside the window is left out (the
    postgresql row of the CPU table still counts it): the report shows the rest as such."""
    spent: dict[str, float] = {}
    for pid, (client, end) in after.items():
        if pid in before and before[pid][0] == client:
            spent[client] = spent.get(client, 0.0) + end - before[pid][1]
    return dict(sorted(spent.items(), key=lambda item: -item[1]))


JIT_THREADS = (b"C1 CompilerThre", b"C2 CompilerThre")
"""HotSpot's JIT compiler threads ("C1 CompilerThread0", …) as /proc names them (15 bytes)."""


def jit_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds the JIT compiler threads of the JVM `pid` have used so far (0 when there is
    no such process). A broker that has just started compiles its hot paths for minutes of
    traffic; this tells that work apart from the requests' own."""
    total = 0
    try:
        tasks = list(os.scandir(proc / str(pid) / "task"))
    except OSError:
        return 0.0
    for task in tasks:
        try:
            if not (Path(task.path) / "comm").read_bytes().startswith(JIT_THREADS):
                continue
        except OSError:  # the thread ended meanwhile
            continue
        stat = _stat_file(Path(task.path) / "stat")
        total += stat[1] if stat else 0
    return total / TICK


HOST_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def host_seconds(stat: Path = Path("/proc/stat")) -> dict[str, float]:
    """The machine's CPU time so far, all cores together, by state (the first line of
    /proc/stat). `steal` is time the hypervisor gave this machine's cores to another guest:
    a window with steal had less than its cores to run in."""
    first = stat.read_text().splitlines()[0].split()
    assert first[0] == "cpu", first
    return {state: int(ticks) / TICK for state, ticks in zip(HOST_STATES, first[1:], strict=False)}


def host_shares(spent: Mapping[str, float]) -> dict[str, float]:
    """A window's machine time as shares of it (each in % of the machine's wall time × cores):
    busy (user, nice, system, irq, softirq), waiting for the disk, stolen, idle."""
    total = sum(spent.values())
    if total <= 0:
        return {}
    busy = sum(spent.get(state, 0.0) for state in ("user", "nice", "system", "irq", "softirq"))
    return {
        "busy": 100 * busy / total,
        "iowait": 100 * spent.get("iowait", 0.0) / total,
        "steal": 100 * spent.get("steal", 0.0) / total,
        "idle": 100 * spent.get("idle", 0.0) / total,
    }


def platform_cpu(cpu_s: Mapping[str, float]) -> float:
    return sum(v for name, v in cpu_s.items() if name not in NOT_PLATFORM)


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    config: StackConfig
    gateway: str
    orders_db: str
    payments_db: str
    watched: Watched
    own: bool
    workdir: Path
    extras: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _own_stack_env(partitions: int) -> dict[str, str]:
    """GOZON_* settings for a throwaway stack: a temporary folder and free ports."""
    data_dir = Path(tempfile.mkdtemp(prefix="gozon-capacity-"))
    data_dir.chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
    return {**stack_env(data_dir), "GOZON_KAFKA_TOPIC_PARTITIONS": str(partitions)}


def start_stack(args: argparse.Namespace) -> Stack:
    if args.venv and args.stack != "own":  # a running stack's processes are already started
        raise SystemExit("--venv needs the bench's own stack")
    if args.stack == "own":
        os.environ.update(_own_stack_env(args.partitions))
    config = StackConfig.from_env()
    pg = config.postgres()
    kafka = dataclasses.replace(config.kafka(), partitions=args.partitions)
    platform = Platform(config, command=_command_from(dict(args.venv)))
    if args.stack == "own":
        print(f"starting a stack in {config.data_dir} …", file=sys.stderr)
        try:
            pg.start()
            kafka.start()
            env = config.platform_env(pg, kafka)
            migrate_and_create_topics(env, kafka)
            platform.start(env)
        except BaseException:
            platform.stop()
            kafka.stop()
            pg.stop()
            raise
    states = platform.states()
    missing = [p.name for p in PROCESSES if states.get(p.name) is None or not states[p.name].pid]
    if missing or pg.running_pid() is None or kafka.running_pid() is None:
        raise SystemExit(f"the stack is not whole (missing: {missing}); start it with `make up`")
    watched = Watched()
    for process in PROCESSES:
        watched.pids[process.name] = (states[process.name].pid, False)
    watched.pids["postgresql"] = (pg.running_pid() or 0, False)
    watched.pids["kafka"] = (kafka.running_pid() or 0, False)
    watched.pids["supervisord"] = (platform.pidfile.pid() or 0, True)  # its children are above
    watched.pids[BENCH] = (os.getpid(), True)
    gateway_port = os.environ.get("GOZON_GATEWAY_PORT", "8080")
    stack = Stack(
        config=config,
        gateway=f"http://127.0.0.1:{gateway_port}",
        orders_db=pg.url("order_db", driver="postgresql"),
        payments_db=pg.url("account_db", driver="postgresql"),
        watched=watched,
        own=args.stack == "own",
        workdir=Path(tempfile.mkdtemp(prefix="gozon-capacity-vegeta-")),
    )
    if args.replicas:
        if args.stack != "own":
            raise SystemExit("--replicas needs the bench's own stack")
        try:
            _scale(stack, {**os.environ, **config.platform_env(pg, kafka)}, args)
        except BaseException:
            stop_stack(stack, keep=False)
            raise
    return stack


def _scale(stack: Stack, env: Mapping[str, str], args: argparse.Namespace) -> None:
    """A scale knob (docs/adr/0012-partitions-and-replicas.md): more replicas of a relay or a
    consumer, started beside supervisord's one with the same settings and a side port of their
    own, each watched like the others."""
    by_name = {process.name: process for process in PROCESSES}
    logs = stack.config.data_dir / "logs"
    for name, count in args.replicas:
        process = by_name.get(name)
        if process is None or process.kind not in ("relay", "consumer"):
            raise SystemExit(f"--replicas: {name} is not a relay or a consumer")
        gozon = _replica_gozon(name, dict(args.venv))
        for n in range(2, count + 1):
            own_env = {**env, process.port_setting: str(free_ports(1)[0])}
            with (logs / f"{name}-{n}.log").open("ab") as log:
                child = subprocess.Popen(
                    [str(gozon), *process.args],
                    env=own_env,
                    stdout=log,
                    stderr=log,
                )
            stack.extras.append(child)
            stack.watched.pids[f"{name} #{n}"] = (child.pid, False)
    # each replica has joined its consumer group before anything is measured
    time.sleep(15)
    for child in stack.extras:
        if child.poll() is not None:
            raise SystemExit(f"an extra process exited at start ({child.args!r}); see {logs}")


def stop_stack(stack: Stack, keep: bool) -> None:
    shutil.rmtree(stack.workdir, ignore_errors=True)
    for child in stack.extras:
        child.terminate()
    for child in stack.extras:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    if not stack.own or keep:
        return
    config = stack.config
    Platform(config).stop()
    config.kafka().stop()
    config.postgres().stop()
    shutil.rmtree(config.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- load


async def fund(gateway: str, users: list[str]) -> None:
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(user: str) -> None:
            async with http.post(
                f"{gateway}/api/payments/deposit?amount=100000000",
                headers={"X-User-Id": user, "Idempotency-Key": f"fund-{user}"},
            ) as response:
                if response.status not in (200, 201):
                    raise SystemExit(f"funding {user}: {response.status} {await response.text()}")

        await asyncio.gather(*(one(user) for user in users))


def write_targets(path: Path, gateway: str, users: list[str], prefix: str, count: int) -> None:
    """`count` orders, each its own key (also its description), users round robin."""
    with path.open("w") as out:
        for n in range(count):
            key = f"{prefix}-{n}"
            body = json.dumps({"amount": 1, "description": key}).encode()
            target = {
                "method": "POST",
                "url": f"{gateway}/api/orders",
                "body": base64.b64encode(body).decode(),
                "header": {
                    "X-User-Id": [users[n % len(users)]],
                    "Idempotency-Key": [key],
                    "Content-Type": ["application/json"],
                },
            }
            out.write(json.dumps(target, separators=(",", ":")) + "\n")


@dataclass
class Sample:
    t: float  # seconds since the attack began
    new: int
    order_outbox: int
    payment_outbox: int
    cpu: dict[str, float]


async def sample(
    stack: Stack, orders: asyncpg.Connection, payments: asyncpg.Connection, started: float
) -> Sample:
    cpu = stack.watched.snapshot()
    new = await orders.fetchval("SELECT count(*) FROM orders WHERE status = 'NEW'")
    order_outbox = await orders.fetchval(
        "SELECT count(*) FROM order_outbox WHERE status = 'PENDING'"
    )
    payment_outbox = await payments.fetchval(
        "SELECT count(*) FROM payment_outbox WHERE status = 'PENDING'"
    )
    return Sample(time.time() - started, new, order_outbox, payment_outbox, cpu)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class RateResult:
    rate: int
    duration: int
    warmup: int
    load_before: str
    load_after: str = ""
    vegeta: dict[str, Any] = field(default_factory=dict)
    completed_per_s: float = 0.0
    completed_in_window: int = 0
    latencies_ms: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    drained_after_s: float | None = None
    samples: list[Sample] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    pg_clients_s: dict[str, float] = field(default_factory=dict)
    """PostgreSQL's CPU in the window by client (`pg_clients_delta`)."""
    kafka_jit_s: float = 0.0
    """Of Kafka's CPU in the window, its JIT compiler threads' (`jit_seconds`)."""
    host_s: dict[str, float] = field(default_factory=dict)
    """The machine's CPU time in the window by state, all cores (`host_seconds`)."""
    window_s: float = 0.0


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor as /proc/cpuinfo names it, with its cache and clock: hosts of one kind
    differ, and the figures move with them."""
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return ", ".join(
        value
        for value in (
            fields.get("model name"),
            fields.get("cache size") and f"cache {fields['cache size']}",
            fields.get("cpu MHz") and f"{float(fields['cpu MHz']):.0f} MHz",
        )
        if value
    )


@dataclass
class Ends:
    """What is read at each end of a window besides the processes' CPU (`Sample`)."""

    pg_backends: dict[int, tuple[str, float]]
    kafka_jit_s: float
    host_s: dict[str, float]

    @classmethod
    async def read(cls, orders: asyncpg.Connection, kafka_pid: int) -> Ends:
        return cls(await pg_backends(orders), jit_seconds(kafka_pid), host_seconds())


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def run_rate(
    stack: Stack, users: list[str], rate: int, args: argparse.Namespace
) -> RateResult:
    result = RateResult(rate, args.duration, args.warmup, loadavg())
    prefix = f"cap-{uuid.uuid4().hex[:8]}-{rate}"
    targets = stack.workdir / f"targets-{rate}.jsonl"
    results = stack.workdir / f"results-{rate}.bin"
    write_targets(targets, stack.gateway, users, prefix, rate * args.duration)
    binary = vegeta()
    orders = await asyncpg.connect(stack.orders_db)
    payments = await asyncpg.connect(stack.payments_db)
    try:
        started = time.time()
        attack = await asyncio.create_subprocess_exec(
            binary,
            "attack",
            "-format=json",
            f"-targets={targets}",
            f"-rate={rate}/1s",
            f"-duration={args.duration}s",
            "-timeout=15s",
            "-keepalive=true",
            f"-output={results}",
            stderr=subprocess.PIPE,
        )
        stack.watched.pids[VEGETA] = (attack.pid, False)
        window: dict[str, Sample] = {}
        ends: dict[str, Ends] = {}
        kafka_pid = stack.watched.pids["kafka"][0]
        tick = 0
        deadline = started + args.duration + args.drain
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, started + tick - time.time()))
            now = await sample(stack, orders, payments, started)
            result.samples.append(now)
            if tick == args.warmup:
                window["start"] = now
                ends["start"] = await Ends.read(orders, kafka_pid)
            if tick == args.duration - 1:  # vegeta still runs: its /proc entry is there
                window["end"] = now
                ends["end"] = await Ends.read(orders, kafka_pid)
            if tick >= args.duration and attack.returncode is not None:
                if now.new == 0 and now.order_outbox == 0 and now.payment_outbox == 0:
                    result.drained_after_s = now.t - args.duration
                    break
                if time.time() > deadline:
                    break
        _, stderr = await attack.communicate()
        del stack.watched.pids[VEGETA]
        if attack.returncode != 0:
            raise SystemExit(f"vegeta failed: {stderr.decode()}")
        report = (
            await asyncio.to_thread(
                subprocess.run,
                [binary, "report", "-type=json", str(results)],
                check=True,
                capture_output=True,
                text=True,
            )
        ).stdout
        result.vegeta = json.loads(report)
        t0 = started + window["start"].t
        t1 = started + window["end"].t
        result.window_s = window["end"].t - window["start"].t
        result.cpu_s = cpu_delta(window["start"].cpu, window["end"].cpu)
        start, end = ends["start"], ends["end"]
        result.pg_clients_s = pg_clients_delta(start.pg_backends, end.pg_backends)
        result.kafka_jit_s = end.kafka_jit_s - start.kafka_jit_s
        result.host_s = cpu_delta(start.host_s, end.host_s)
        result.completed_in_window = await orders.fetchval(
            "SELECT count(*) FROM orders WHERE status <> 'NEW' "
            "AND updated_at >= to_timestamp($1) AND updated_at < to_timestamp($2)",
            t0,
            t1,
        )
        result.completed_per_s = result.completed_in_window / result.window_s
        rows = await orders.fetch(
            "SELECT status, extract(epoch FROM updated_at - created_at) * 1000 AS ms "
            "FROM orders WHERE description LIKE $1 "
            "AND created_at >= to_timestamp($2) AND created_at < to_timestamp($3)",
            f"{prefix}-%",
            t0,
            t1,
        )
        all_statuses = await orders.fetch(
            "SELECT status, count(*) AS n FROM orders WHERE description LIKE $1 GROUP BY status",
            f"{prefix}-%",
        )
    finally:
        await orders.close()
        await payments.close()
    result.statuses = {row["status"]: int(row["n"]) for row in all_statuses}
    latencies = [float(row["ms"]) for row in rows if row["status"] in FINAL]
    if latencies:
        result.latencies_ms = {
            "p50": statistics.median(latencies),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": max(latencies),
            "count": len(latencies),
            "still_new": sum(1 for row in rows if row["status"] not in FINAL),
        }
    result.load_after = loadavg()
    return result


async def idle(stack: Stack, seconds: int) -> tuple[dict[str, float], float]:
    """Each process's CPU over `seconds` with no traffic, in % of one core, and the part of
    Kafka's that its JIT compiler threads used."""
    kafka_pid = stack.watched.pids["kafka"][0]
    before, jit_before = stack.watched.snapshot(), jit_seconds(kafka_pid)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after, jit_after = stack.watched.snapshot(), jit_seconds(kafka_pid)
    elapsed = time.monotonic() - started
    pct = {name: 100 * spent / elapsed for name, spent in cpu_delta(before, after).items()}
    return pct, 100 * (jit_after - jit_before) / elapsed


async def warm_up(stack: Stack, users: list[str], rate: int, seconds: int) -> None:
    """An unreported attack before anything is measured: a platform that has just started is
    slower than one that has run for a while (Kafka's JIT compiles its hot paths over some
    thousands of orders; pools and prepared statements fill). The figures are meant to be a
    running platform's, so the default warm-up is 9,000 orders (150/s for 60 s): after 3,000
    the broker's JIT compiler threads still used 16% of a core through a 50/s window, 3.2 ms
    per order, and after 6,000 up to 1.1 ms (docs/benchmarks.md, "Capacity"); the CPU
    table's JIT row shows what is left. Past the machine's capacity the warm-up's excess is
    shed, as any attack's."""
    if seconds <= 0:
        return
    await offer(stack, users, rate, seconds, f"warm-{uuid.uuid4().hex[:8]}")
    orders = await asyncpg.connect(stack.orders_db)
    try:
        await none_new(orders, 60)
    finally:
        await orders.close()


async def offer(stack: Stack, users: list[str], rate: int, seconds: int, prefix: str) -> None:
    """vegeta offers `rate` new orders a second for `seconds` seconds, their descriptions
    starting with `prefix`; unreported (what it measures is read from elsewhere)."""
    targets = stack.workdir / f"{prefix}.jsonl"
    write_targets(targets, stack.gateway, users, prefix, rate * seconds)
    await asyncio.to_thread(
        subprocess.run,
        [
            vegeta(),
            "attack",
            "-format=json",
            f"-targets={targets}",
            f"-rate={rate}/1s",
            f"-duration={seconds}s",
            "-output=/dev/null",
        ],
        check=True,
        capture_output=True,
    )


async def none_new(orders: asyncpg.Connection, seconds: float) -> bool:
    """Waits up to `seconds` until no order is NEW (each was handled by every process on its
    way); whether that happened."""
    deadline = time.monotonic() + seconds
    while await orders.fetchval("SELECT count(*) FROM orders WHERE status = 'NEW'"):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


# --------------------------------------------------------------------------- report


def _ms(nanoseconds: float) -> str:
    return f"{nanoseconds / 1e6:.0f}" if nanoseconds >= 1e7 else f"{nanoseconds / 1e6:.1f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def summary_table(results: list[RateResult]) -> str:
    lines = [
        "| offered | sent/s | 201 | 503 | other | completed/s | order → final p50 / p95 / p99 ms "
        "| NEW backlog max / at end | HTTP p50 / p99 ms | drained after | platform CPU ms/order "
        "| load avg before → after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        codes = {str(k): int(v) for k, v in r.vegeta.get("status_codes", {}).items()}
        created = codes.get("201", 0)
        shed = codes.get("503", 0)
        other = sum(codes.values()) - created - shed
        lat = r.latencies_ms
        window = [s for s in r.samples if r.warmup <= s.t <= r.duration + 0.5]
        backlog_max = max((s.new for s in window), default=0)
        backlog_end = window[-1].new if window else 0
        vl = r.vegeta.get("latencies", {})
        total_cpu = platform_cpu(r.cpu_s)
        per_order = 1000 * total_cpu / r.completed_in_window if r.completed_in_window else None
        drained = f"{r.drained_after_s:.0f} s" if r.drained_after_s is not None else "not drained"
        lines.append(
            f"| {r.rate}/s × {r.duration} s | {r.vegeta.get('rate', 0):.0f} | {created} | {shed} "
            f"| {other} | **{r.completed_per_s:.0f}** "
            f"| {_fmt_ms(lat.get('p50'))} / {_fmt_ms(lat.get('p95'))} / {_fmt_ms(lat.get('p99'))} "
            f"| {backlog_max} / {backlog_end} "
            f"| {_ms(vl.get('50th', 0))} / {_ms(vl.get('99th', 0))} | {drained} "
            f"| {_fmt_ms(per_order)} | {r.load_before} → {r.load_after} |"
        )
    return "\n".join(lines)


def cpu_table(
    results: list[RateResult],
    idle_pct: Mapping[str, float] | None,
    idle_jit_pct: float | None = None,
) -> str:
    names = list(results[0].cpu_s) if results else list(idle_pct or {})
    header = "| process |"
    rule = "| --- |"
    if idle_pct is not None:
        header += " idle, % of a core |"
        rule += " --- |"
    for r in results:
        header += f" {r.rate}/s: ms per order (% of a core) |"
        rule += " --- |"
    lines = [header, rule]
    sums = {"platform (all but vegeta and this script)": platform_cpu, "total": _everything}
    for name in [*names, *sums]:
        row = f"| {name} |"
        add = sums.get(name)
        if idle_pct is not None:
            value = add(idle_pct) if add else idle_pct.get(name, 0.0)
            row += f" {value:.1f} |"
        for r in results:
            spent = add(r.cpu_s) if add else r.cpu_s.get(name, 0.0)
            row += f" {_per_order(r, spent)} |"
        lines.append(row)
        if name == "kafka":  # a part of the row above, not another process
            row = f"| {KAFKA_JIT} |"
            if idle_pct is not None:
                row += f" {idle_jit_pct:.1f} |" if idle_jit_pct is not None else " – |"
            lines.append(row + "".join(f" {_per_order(r, r.kafka_jit_s)} |" for r in results))
    row = f"| {YARDSTICK} |" + (" – |" if idle_pct is not None else "")
    lines.append(row + "".join(f" {platform_per_vegeta(r)} |" for r in results))
    return "\n".join(lines)


YARDSTICK = "platform ÷ vegeta (the host's speed taken out; a rate that shed nothing)"


def platform_per_vegeta(r: RateResult) -> str:
    """The platform's CPU in units of the load generator's, which does the same work per
    order in every run of a rate that sheds nothing: on one host this ratio moved ±5% over
    six runs at 50/s while the platform's ms per order moved ±22% with the host (docs/
    benchmarks.md, "Comparing runs"). A rate that shed requests gives vegeta work that no order
    pays back, so it shows none."""
    codes = {str(k): int(v) for k, v in r.vegeta.get("status_codes", {}).items()}
    vegeta = r.cpu_s.get("vegeta", 0.0)
    if vegeta <= 0 or set(codes) - {"201"}:
        return "–"
    return f"{platform_cpu(r.cpu_s) / vegeta:.1f}"


def _per_order(r: RateResult, spent: float) -> str:
    per = 1000 * spent / r.completed_in_window if r.completed_in_window else 0.0
    return f"{per:.2f} ({100 * spent / r.window_s:.0f}%)"


PG_REST = "backends that came or went in the window"


def pg_clients_table(results: list[RateResult]) -> str:
    """PostgreSQL's row of the CPU table, split by the client each backend serves."""
    names: list[str] = []
    for r in results:
        names += [name for name in r.pg_clients_s if name not in names]
    header, rule = "| PostgreSQL, by client |", "| --- |"
    for r in results:
        header += f" {r.rate}/s: ms per order (% of a core) |"
        rule += " --- |"
    lines = [header, rule]
    for name in [*names, PG_REST]:
        row = f"| {name} |"
        for r in results:
            if name == PG_REST:
                spent = r.cpu_s.get("postgresql", 0.0) - sum(r.pg_clients_s.values())
            else:
                spent = r.pg_clients_s.get(name, 0.0)
            per = 1000 * spent / r.completed_in_window if r.completed_in_window else 0.0
            row += f" {per:.2f} ({100 * spent / r.window_s:.0f}%) |" if r.window_s else " – |"
        lines.append(row)
    return "\n".join(lines)


def host_table(results: list[RateResult]) -> str:
    """The whole machine in each window (everything on it, ours or not): how much of its cores
    was busy, waiting for the disk, stolen by the hypervisor, or idle."""
    header = f"| the machine ({os.cpu_count()} cores), % of its time |"
    rule = "| --- |"
    for r in results:
        header += f" {r.rate}/s |"
        rule += " --- |"
    lines = [header, rule]
    shares = [host_shares(r.host_s) for r in results]
    for state in ("busy", "iowait", "steal", "idle"):
        lines.append(
            f"| {state} |" + "".join(f" {s[state]:.1f} |" if s else " – |" for s in shares)
        )
    return "\n".join(lines)


def _everything(cpu_s: Mapping[str, float]) -> float:
    return sum(cpu_s.values())


def backlog_lines(r: RateResult) -> str:
    marks = " ".join(f"{s.t:.0f}s:{s.new}/{s.order_outbox}/{s.payment_outbox}" for s in r.samples)
    return (
        f"{r.rate}/s, backlog each second (NEW orders / order_outbox PENDING / "
        f"payment_outbox PENDING): {marks}"
    )


# --------------------------------------------------------------------------- main


@dataclass
class Idle:
    """The idle window: each process's CPU in % of one core, and Kafka's JIT threads' part."""

    pct: dict[str, float]
    kafka_jit_pct: float


WAKE_GAP_MS = 20.0  # a process's idle gap between orders at 50 orders/s


async def wake_price(stack: Stack, batches: int) -> float:
    """CPU µs of one worker-like batch done every WAKE_GAP_MS (bench.event_loop), on uvloop."""
    user, system = await asyncio.to_thread(
        child_cpu, stack.orders_db, "uvloop", batches, WAKE_GAP_MS
    )
    return 1e6 * (user + system) / batches


async def measure(
    stack: Stack, args: argparse.Namespace
) -> tuple[Idle | None, list[RateResult], float | None]:
    users = [f"cap-user-{uuid.uuid4().hex[:6]}-{n}" for n in range(args.users)]
    await fund(stack.gateway, users)
    await warm_up(stack, users, args.warm_rate, args.warm_seconds)
    idle_window = None
    if args.idle:
        # after the warm-up: the broker's JIT compilations and log housekeeping that it set
        # off, the relays' and consumers' last batches, and PostgreSQL's autovacuum of the
        # warm-up's rows are over (after 30 s they were not: docs/benchmarks.md, "Capacity")
        await asyncio.sleep(args.settle)
        idle_window = Idle(*await idle(stack, args.idle))
    results = []
    for rate in args.rates:
        print(f"{rate}/s for {args.duration} s …", file=sys.stderr)
        results.append(await run_rate(stack, users, rate, args))
        print(summary_table(results[-1:]), file=sys.stderr)
        await asyncio.sleep(args.pause)
    wake = await wake_price(stack, args.wake_batches) if args.wake_batches else None
    return idle_window, results, wake


def run(args: argparse.Namespace) -> int:
    stack = start_stack(args)  # synchronous: the launcher runs its own event loops
    try:
        idle_window, results, wake = asyncio.run(measure(stack, args))
    finally:
        stop_stack(stack, args.keep)

    print(
        f"\n`bench.capacity` {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores ({cpu_model()}), {args.users} users, "
        f"partitions {args.partitions}, "
        f"stack: {args.stack}, steady window = attack minus its first {args.warmup} s"
        + "".join(f", {name} ×{count}" for name, count in args.replicas)
        + "".join(f", {name} from {venv}" for name, venv in args.venv)
        + (
            f", a wake-up after {WAKE_GAP_MS:.0f} ms asleep: {wake:,.0f} µs of CPU per batch"
            if wake is not None
            else ""
        )
        + "\n"
    )
    print(summary_table(results))
    print()
    if idle_window is None:
        print(cpu_table(results, None))
    else:
        print(cpu_table(results, idle_window.pct, idle_window.kafka_jit_pct))
    print()
    print(pg_clients_table(results))
    print()
    print(host_table(results))
    print()
    for r in results:
        print(backlog_lines(r))
    if args.json:
        figures = {
            "idle_pct": idle_window and idle_window.pct,
            "idle_kafka_jit_pct": idle_window and idle_window.kafka_jit_pct,
            "wake_us_per_batch": wake,
            "results": [dataclasses.asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def _command_from(venvs: Mapping[str, str]) -> Callable[[Process], str]:
    """How supervisord runs each process: `gozon …` from this tree's virtualenv, or from the
    one `--venv` names for it (a paired A/B: two processes of one kind, e.g. the two relays,
    one per interpreter or tree, measured in the same run and on the same orders)."""

    def command(process: Process) -> str:
        venv = venvs.get(process.name)
        return f"{_venv_gozon(venv).parent}/{process.command}" if venv else process.command

    return command


def _venv_gozon(venv: str) -> Path:
    """The `gozon` of a virtualenv `--venv` names."""
    return Path(venv).resolve() / "bin" / "gozon"


def _replica_gozon(name: str, venvs: Mapping[str, str]) -> Path:
    """The `gozon` a `--replicas` copy runs: the one `--venv` names for its process, as
    supervisord's copy does, else this bench's own."""
    venv = venvs.get(name)
    return _venv_gozon(venv) if venv else Path(sys.executable).parent / "gozon"


def _venvs(text: str) -> list[tuple[str, str]]:
    pairs = []
    names = {p.name for p in PROCESSES}
    for item in text.split(","):
        name, _, venv = item.partition("=")
        if name.strip() not in names or not _venv_gozon(venv).is_file():
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected PROCESS=VIRTUALENV, a process of the table and a "
                "virtualenv with gozon installed"
            )
        pairs.append((name.strip(), venv))
    return pairs


def _replicas(text: str) -> list[tuple[str, int]]:
    pairs = []
    for item in text.split(","):
        name, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=COUNT")
        pairs.append((name.strip(), int(count)))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 300]
    )
    parser.add_argument("--duration", type=int, default=60, help="seconds per rate")
    parser.add_argument("--warmup", type=int, default=10, help="seconds left out of the window")
    parser.add_argument(
        "--warm-rate", type=int, default=150, help="orders/s of the unreported warm-up attack"
    )
    parser.add_argument(
        "--warm-seconds", type=int, default=60, help="length of the warm-up attack (0: none)"
    )
    parser.add_argument("--drain", type=int, default=120, help="seconds to wait for finals")
    parser.add_argument("--pause", type=int, default=5, help="seconds between rates")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--idle", type=int, default=30, help="idle measurement, s (0: none)")
    parser.add_argument(
        "--settle", type=int, default=90, help="seconds between the warm-up and the idle window"
    )
    parser.add_argument("--stack", choices=("own", "running"), default="own")
    parser.add_argument("--partitions", type=int, default=3, help="topic partitions (own)")
    parser.add_argument("--keep", action="store_true", help="leave the own stack running")
    parser.add_argument(
        "--replicas",
        type=_replicas,
        default=[],
        help="more replicas of relays/consumers, e.g. payments-consumer=2,orders-relay=2",
    )
    parser.add_argument(
        "--venv",
        type=_venvs,
        default=[],
        help="run these processes from another virtualenv (own stack), "
        "e.g. orders-relay=../other/.venv",
    )
    parser.add_argument(
        "--wake-batches",
        type=int,
        default=500,
        help="batches of the host's wake-up probe after the last rate (0: none)",
    )
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    if not 0 < args.warmup < args.duration - 1:
        parser.error("--warmup must be at least 1 s and 2 s shorter than --duration")
    # SIGTERM (a timeout, a runner's stop) still runs the clean-up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
