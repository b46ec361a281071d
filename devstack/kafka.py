"""Apache Kafka: one 4.x node in KRaft mode (broker and controller in one JVM) in a data folder.

Its jars are resolved once by Maven from `devstack/kafka-pom.xml` into the cache folder and
reused after that; it runs on the machine's Java 17+ (Debian's, installed where missing).
`start` formats the storage once and is idempotent: a broker of ours already running is
reused. `stop` stops only a broker of ours (its pid file's process, with our config on its
command line). The admin calls (readiness, topics, ACLs) import aiokafka when they run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.apt import apt_install
from devstack.system import (
    ROOT,
    PidFile,
    StackError,
    one_at_a_time,
    require_free_port,
    run,
    wait_until,
)

KAFKA_POM = ROOT / "devstack" / "kafka-pom.xml"
DEFAULT_KAFKA_VERSION = "4.4.0"


def java_major_version(java: str = "java") -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def kafka_jars(cache_dir: Path, version: str = DEFAULT_KAFKA_VERSION) -> Path:
    """The folder of Kafka's jars, resolved by Maven on first use and reused after that.

    Safe to call from several processes at once (`make test`'s pytest-xdist workers on a fresh
    checkout): one resolves under a lock on the cache folder, the others wait and reuse it."""
    libs = cache_dir / f"kafka-{version}" / "libs"
    complete = libs.parent / ".complete"
    if complete.exists():
        return libs
    with one_at_a_time(libs.parent / ".lock"):
        if not complete.exists():
            _resolve(libs, version)
            complete.write_text(f"{version}\n")
    return libs


def _resolve(libs: Path, version: str) -> None:
    if shutil.which("mvn") is None:
        apt_install("maven", why="Maven is needed to resolve Kafka's jars")
    staging = libs.parent / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"resolving Apache Kafka {version} with Maven into {libs}", file=sys.stderr)
    try:
        run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            what=f"downloading Apache Kafka {version} with Maven",
        )
    except StackError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not any(staging.glob(f"kafka_2.13-{version}.jar")):
        raise StackError(f"Maven finished but kafka_2.13-{version}.jar is not in {staging}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)


_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
# every client and server prints its whole configuration at INFO: keep the log readable
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


# A single-node development broker on a small machine: fewer threads and fewer timers than
# Kafka's defaults, which are sized for a broker of a cluster with many clients. Each idle
# request handler and network thread wakes every 300 ms, and the controller, the broker and
# the group coordinator each run their own pool (8 request handlers each for the broker and
# the controller, 3 network threads per listener, 4 group coordinator threads): 29 threads
# polling for a handful of clients. The active controller writes a no-op record to the
# metadata log every `metadata.max.idle.interval.ms` (500 ms by default: KIP-835, so that a
# cluster's brokers can tell a live controller from a stuck one); one node in one JVM has
# nobody to tell. Measured in docs/adr/0011-development-broker.md;
# docker-compose.yml sets the same (tests/unit/test_compose.py); the Helm chart's Strimzi
# cluster keeps Kafka's defaults (docs/local-stack.md).
DEV_BROKER_CONFIG: Mapping[str, str] = {
    "num.network.threads": "1",
    "num.io.threads": "2",
    "group.coordinator.threads": "1",
    "metadata.max.idle.interval.ms": "5000",
}
# The JVM: the serial collector has no concurrent or periodic threads (G1 has its refinement,
# marking and service threads) and the cheapest write barrier; its cost is a longer pause (a
# young collection every several minutes, ~0.1 s on a starved machine, against G1's ~10 ms:
# docs/local-stack.md). `-UsePerfData` stops the 20-times-a-second sampler that feeds `jstat`
# (jcmd and JMX still work).
DEV_JVM_OPTIONS: tuple[str, ...] = ("-XX:+UseSerialGC", "-XX:-UsePerfData")


@dataclass
class Kafka:
    """One Apache Kafka 4.x node in KRaft mode (broker and controller in one JVM)."""

    data_dir: Path
    port: int
    controller_port: int
    cache_dir: Path
    version: str = DEFAULT_KAFKA_VERSION
    heap: str = "768m"
    partitions: int = 3
    start_timeout: float = 90.0
    extra_config: Mapping[str, str] = field(default_factory=dict)
    # A second listener that authenticates with SASL SCRAM-SHA-512, as the chart's Strimzi
    # Kafka does, with these users (name → password, made when the storage is formatted)
    # and ACLs enforced (StandardAuthorizer). The plaintext listener stays, its anonymous
    # principal a super user: readiness, topic creation and `allow` go through it.
    sasl_port: int | None = None
    scram_users: Mapping[str, str] = field(default_factory=dict)
    # With a PEM key store (PKCS#8 key, then its certificate chain) that listener is TLS
    # (SASL_SSL), as Strimzi's TLS listener with SCRAM is.
    sasl_tls_keystore: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        if self.sasl_port is None:
            raise StackError("this Kafka has no SASL listener")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def config(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log(self) -> Path:
        return self.data_dir / "kafka.log"

    def __post_init__(self) -> None:
        self.pidfile = PidFile(self.data_dir / "kafka.pid", marker=str(self.config))

    def running_pid(self) -> int | None:
        return self.pidfile.pid()

    def install(self) -> Path:
        major = java_major_version()
        if major is None:
            apt_install("openjdk-17-jre-headless", why="Java is missing (Kafka needs 17+)")
            major = java_major_version()
        if major is None or major < 17:
            raise StackError(f"Kafka {self.version} needs Java 17 or newer; `java` is {major}")
        return kafka_jars(self.cache_dir, self.version)

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # A static voter set: the ports can change between runs without reformatting.
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created on purpose (by the relays and `make up`), never by a typo.
            "auto.create.topics.enable": "false",
            **DEV_BROKER_CONFIG,
            **self._sasl_config(),
            **self.extra_config,
        }
        self.config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)

    def _sasl_config(self) -> dict[str, str]:
        if self.sasl_port is None:
            return {}
        sasl = "SASL_SSL" if self.sasl_tls_keystore else "SASL_PLAINTEXT"
        tls = (
            {
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
                "listener.name.sasl_ssl.ssl.keystore.location": str(self.sasl_tls_keystore),
            }
            if self.sasl_tls_keystore
            else {}
        )
        return {
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},{sasl}://127.0.0.1:{self.sasl_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},{sasl}://127.0.0.1:{self.sasl_port}"
            ),
            "listener.security.protocol.map": (
                f"PLAINTEXT:PLAINTEXT,{sasl}:{sasl},CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            f"listener.name.{sasl.lower()}.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            **tls,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }

    def allow(
        self,
        user: str,
        operations: Sequence[str],
        *,
        topics: Sequence[str] = (),
        groups: Sequence[str] = (),
        prefixed: bool = False,
    ) -> None:
        """Adds ACLs allowing `user` the operations (READ, WRITE, CREATE, DESCRIBE, …) on the
        topics and groups, named or (`prefixed`) every name starting with them."""
        resources = [(_ACL_TOPIC, t) for t in topics] + [(_ACL_GROUP, g) for g in groups]
        asyncio.run(create_acls(self.bootstrap, user, operations, resources, prefixed=prefixed))

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xms256m",
            f"-Xmx{self.heap}",
            *DEV_JVM_OPTIONS,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def _format(self, libs: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's own ids: the CLI would read it as a flag
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        run(
            self._java(
                libs,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.config),
                *(
                    f"--add-scram=SCRAM-SHA-512=[name={name},password={password}]"
                    for name, password in self.scram_users.items()
                ),
            ),
            what="formatting Kafka's storage",
        )

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        return asyncio.run(kafka_answers(self.bootstrap))

    def start(self) -> bool:
        """Starts the broker (formatting its storage once); False when it already ran."""
        libs = self.install()
        if self.running_pid() is not None:
            wait_until(self.is_ready, timeout=self.start_timeout, what="Kafka", log=self.log)
            return False
        require_free_port(self.port, "Kafka")
        require_free_port(self.controller_port, "Kafka's controller")
        if self.sasl_port is not None:
            require_free_port(self.sasl_port, "Kafka's SASL listener")
        self._write_config()
        self._format(libs)
        process = self.pidfile.spawn(
            self._java(libs, "kafka.Kafka", str(self.config)), log=self.log
        )
        try:
            wait_until(
                self.is_ready,
                timeout=self.start_timeout,
                what="Kafka",
                log=self.log,
                alive=lambda: process.poll() is None,
            )
        except StackError:
            self.stop()
            raise
        return True

    def stop(self) -> bool:
        return self.pidfile.stop(timeout=60)

    def create_topics(self, names: Sequence[str], partitions: int | None = None) -> None:
        asyncio.run(create_topics(self.bootstrap, names, partitions or self.partitions))


async def kafka_answers(bootstrap: str) -> bool:
    """True when the broker answers a metadata request with itself in the broker list."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(admin.start(), timeout=3)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout=3)
        return bool(cluster.get("brokers"))
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


# Kafka's ACL codes (org.apache.kafka.common.acl and .resource).
_ACL_TOPIC, _ACL_GROUP = 2, 3
_ACL_LITERAL, _ACL_PREFIXED, _ACL_ALLOW = 3, 4, 3
_ACL_OPERATIONS = {
    "ALL": 2,
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DELETE": 6,
    "ALTER": 7,
    "DESCRIBE": 8,
    "DESCRIBE_CONFIGS": 10,
    "ALTER_CONFIGS": 11,
}


async def create_acls(
    bootstrap: str,
    user: str,
    operations: Sequence[str],
    resources: Sequence[tuple[int, str]],
    *,
    prefixed: bool = False,
) -> None:
    """Allows `User:user` the operations on the (resource type, name) pairs: Kafka's
    CreateAcls request, v1 (aiokafka has no call for it and Kafka's own AclCommand is not
    among the broker's jars)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import Array, Int8, Int16, Int32, Schema, String

    class CreateAclsResponseV1(Response):  # type: ignore[misc]  # aiokafka: untyped
        API_KEY = 30
        API_VERSION = 1
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            ("results", Array(("error_code", Int16), ("error_message", String("utf-8")))),
        )

    class CreateAclsRequestV1(RequestStruct):  # type: ignore[misc]
        API_KEY = 30
        API_VERSION = 1
        RESPONSE_TYPE = CreateAclsResponseV1
        SCHEMA = Schema(
            (
                "creations",
                Array(
                    ("resource_type", Int8),
                    ("resource_name", String("utf-8")),
                    ("resource_pattern_type", Int8),
                    ("principal", String("utf-8")),
                    ("host", String("utf-8")),
                    ("operation", Int8),
                    ("permission_type", Int8),
                ),
            ),
        )

    pattern = _ACL_PREFIXED if prefixed else _ACL_LITERAL
    creations = [
        (kind, name, pattern, f"User:{user}", "*", _ACL_OPERATIONS[op.upper()], _ACL_ALLOW)
        for kind, name in resources
        for op in operations
    ]

    class CreateAcls(Request[CreateAclsRequestV1]):  # type: ignore[misc]
        API_KEY = 30

        def build(self, request_struct_class: type[CreateAclsRequestV1]) -> CreateAclsRequestV1:
            return request_struct_class(creations)

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin._send_request(CreateAcls())
    finally:
        await admin.close()
    errors = [message or str(code) for code, message in response.results if code]
    if errors:
        raise StackError(f"Kafka refused ACLs for {user}: {'; '.join(errors)}")


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Creates the topics that are missing; existing ones are left as they are."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        missing = set(names) - set(await admin.list_topics())
        if missing:
            await admin.create_topics(
                [
                    NewTopic(name, num_partitions=partitions, replication_factor=1)
                    for name in sorted(missing)
                ]
            )
    finally:
        await admin.close()
