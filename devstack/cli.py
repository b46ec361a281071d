"""`python -m devstack up | down | status | logs`: the commands behind `make up / down / status /
logs`. Messages go to the terminal; a `StackError` is printed as one line and exit status 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from devstack.platform import Platform, StackConfig, health_urls, http_ok, migrate_and_create_topics
from devstack.supervisor import process_log
from devstack.system import StackError
from gozon.processes import PROCESSES


def up(config: StackConfig) -> None:
    pg, kafka = config.postgres(), config.kafka()
    started = pg.start()
    print(
        f"PostgreSQL  {'started' if started else 'already running'} on 127.0.0.1:{pg.port} "
        f"(databases: {', '.join(pg.databases)})"
    )
    started = kafka.start()
    print(
        f"Kafka {kafka.version} {'started' if started else 'already running'} on {kafka.bootstrap}"
    )
    env = config.platform_env(pg, kafka)
    migrate_and_create_topics(env, kafka)
    urls = Platform(config).start(env)
    for name, url in urls.items():
        print(f"{name:<18} {url}")
    print(f"logs: {config.data_dir / 'logs'} and {pg.log}, {kafka.log}  (make logs)")


def down(config: StackConfig) -> None:
    for what, stop in (
        ("supervisord and the platform", Platform(config).stop),
        ("Kafka", config.kafka().stop),
        ("PostgreSQL", config.postgres().stop),
    ):
        print(f"{what}: {'stopped' if stop() else 'was not running'}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def status(config: StackConfig) -> int:
    pg, kafka, platform = config.postgres(), config.kafka(), Platform(config)
    rows = [
        ("PostgreSQL", pg.running_pid(), f"127.0.0.1:{pg.port}"),
        ("Kafka", kafka.running_pid(), kafka.bootstrap),
        ("supervisord", platform.pidfile.pid(), str(platform.conf)),
    ]
    for name, pid, where in rows:
        print(f"{name:<12} {'running, pid ' + str(pid) if pid else 'stopped':<22} {where}")
    states = platform.states()
    env = {**os.environ, **config.platform_env(pg, kafka)}
    healthy = True
    for name, url in health_urls(env).items():
        state = states.get(name)
        if state is None:
            print(f"  {name:<18} {'not supervised':<10}")
            healthy = False
            continue
        ready = http_ok(url + "/health/ready")
        healthy = healthy and state.state == "RUNNING" and ready
        print(
            f"  {name:<18} {state.state:<9} pid {state.pid or '-':<8} "
            f"up {_duration(state.uptime):>8}  restarts {state.restarts:<3} "
            f"{'ready' if ready else 'not ready':<9}  {url}"
        )
    return 0 if all(pid for _, pid, _ in rows) and healthy else 3


def _log_files(config: StackConfig) -> Iterator[Path]:
    platform = Platform(config)
    paths = [
        config.postgres().log,
        config.kafka().log,
        platform.log,
        *(process_log(config.data_dir, p.name) for p in PROCESSES),
    ]
    for path in paths:
        if path.exists():
            yield path


def logs(config: StackConfig, follow: bool, lines: int) -> None:
    files = [str(path) for path in _log_files(config)]
    if not files:
        print("no logs yet: run `make up`")
        return
    cmd = ["tail", f"-n{lines}", *(["-F"] if follow else []), *files]
    os.execvp("tail", cmd)  # noqa: S606 (replaces this process with tail, on purpose)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack", description="The local Gozon stack."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="install what is missing, start everything, wait until it answers")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="what runs and what answers")
    logs_parser = sub.add_parser("logs", help="the servers' and processes' logs")
    logs_parser.add_argument("-f", "--follow", action="store_true")
    logs_parser.add_argument("-n", "--lines", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        config = StackConfig.from_env()
        if args.command == "up":
            up(config)
        elif args.command == "down":
            down(config)
        elif args.command == "status":
            return status(config)
        elif args.command == "logs":
            logs(config, args.follow, args.lines)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
