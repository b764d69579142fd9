"""Apache Kafka on loopback: one KRaft node, or a cluster of several, from Maven's jars.

The jars come from Maven Central through the project's own Maven project
(tidegate/broker_files/pom.xml, package data: an installed wheel fetches the same
jars as a checkout): `mvn` copies the runtime dependencies of
`org.apache.kafka:kafka_2.13` and a log4j2 binding into
`~/.cache/tidegate/kafka-<version>/libs`, once. Each node is formatted
(`kafka.tools.StorageTool format`) into a fresh data folder and started as
`kafka.Kafka server.properties`, with the settings in tidegate/broker_files/broker.properties
plus its own node id, listeners and quorum. Every node is a combined broker and
controller; a cluster of N nodes has N controller voters.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tidegate.processes import DevStackError, free_port, spawn, stop_pid, wait_listening, wait_until

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
# inside the package, so that a wheel carries them (pyproject.toml's package-data)
BROKER_FILES = Path(__file__).resolve().parent / "broker_files"
POM = BROKER_FILES / "pom.xml"
SHARED_PROPERTIES = BROKER_FILES / "broker.properties"
# a small heap and the serial collector: the broker shares two cores with the stages
JVM_OPTIONS = ["-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
LOG4J2 = """Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""
START_TIMEOUT_S = 60.0
SCRAM = "SCRAM-SHA-256"


@dataclass(frozen=True)
class Sasl:
    """A cluster whose clients authenticate with SASL/SCRAM and are authorized by
    ACLs (StandardAuthorizer, nothing allowed without an ACL). `admin` is a super
    user, created when the nodes are formatted; it runs the stages and adds tenants
    (tidegate/tenancy.py). The controller listener stays PLAINTEXT on loopback, its
    (anonymous) peers super users: the nodes talk to each other there."""

    admin: str = "admin"
    password: str = field(default_factory=lambda: uuid.uuid4().hex)

    def client_config(self) -> dict[str, str]:
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": SCRAM,
            "sasl.username": self.admin,
            "sasl.password": self.password,
        }


def cache_dir() -> Path:
    return Path(os.environ.get("TIDEGATE_CACHE_DIR", Path.home() / ".cache" / "tidegate"))


def kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """The broker's jars, fetched by Maven on first use (a file lock: once)."""
    libs = cache_dir() / f"kafka-{version}" / "libs"
    if (libs / f"kafka_2.13-{version}.jar").exists():
        return libs
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise DevStackError(f"{tool} is not installed: run `make setup` (OpenJDK 17 and Maven from Debian)")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (libs / f"kafka_2.13-{version}.jar").exists():
            tmp = libs.with_name("libs.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("fetching Apache Kafka %s's jars with Maven into %s (once)", version, libs)
            result = subprocess.run(
                [
                    "mvn",
                    "-q",
                    "-B",
                    "-f",
                    str(POM),
                    f"-Dkafka.version={version}",
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={tmp}",
                    "-DincludeScope=runtime",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                tail = (result.stdout + result.stderr)[-2000:]
                raise DevStackError(f"mvn could not fetch Apache Kafka {version}:\n{tail}")
            tmp.rename(libs)
    return libs


def shared_properties() -> dict[str, str]:
    """broker_files/broker.properties as a dict (comments and blank lines skipped)."""
    props = {}
    for line in SHARED_PROPERTIES.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    data_dir: Path
    config: Path
    log_path: Path
    pid: int | None = None


@dataclass
class KafkaCluster:
    """Nodes of one KRaft cluster on loopback; `bootstrap` lists every node."""

    nodes: list[KafkaNode]
    libs: Path
    nice: int = 0
    log4j: Path = field(default_factory=Path)
    sasl: Sasl | None = None
    _procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid is not None]

    def start_node(self, index: int, wait: bool = True) -> None:
        """Starts (or restarts, on the same data) node `index`; with `wait`, returns once
        it listens (a node of a cluster listens once a quorum of controllers is up)."""
        node = self.nodes[index]
        cmd = [
            "java",
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.log4j}",
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(node.config),
        ]
        proc = spawn(cmd, node.log_path, nice=self.nice)
        node.pid = proc.pid
        self._procs[index] = proc
        if wait:
            self.wait_listening(index)

    def wait_listening(self, index: int) -> None:
        node, proc = self.nodes[index], self._procs[index]
        what = f"kafka node {node.node_id} on port {node.port}"
        wait_listening(proc, node.port, what, node.log_path, START_TIMEOUT_S)

    def stop_node(self, index: int, kill: bool = False) -> None:
        """Stops node `index`: SIGTERM (controlled shutdown) or, with `kill`, SIGKILL."""
        node = self.nodes[index]
        if node.pid is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(node.pid, 0)
        else:
            stop_pid(node.pid, timeout_s=30)
        node.pid = None

    def wait_for_metadata(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every running node is in the cluster's metadata and the group
        coordinator answers (right after a start it says "load in progress")."""
        auth = self.sasl.client_config() if self.sasl else {}
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000, **auth})
        running = sum(1 for n in self.nodes if n.pid is not None)
        probe = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "tidegate-readiness-probe", **auth})
        offsets = TopicPartition("__consumer_offsets", 0)

        def ready() -> bool:
            try:
                if len(admin.list_topics(timeout=2).brokers) < running:
                    return False
                probe.committed([offsets], timeout=3)  # raises while the coordinator loads
                return True
            except KafkaException:
                return False

        try:
            wait_until(ready, timeout_s, f"{running} kafka node(s) in the metadata, groups served", interval_s=0.2)
        finally:
            probe.close()

    def stop(self) -> None:
        """SIGTERM to every node at once (one by one, the last would wait for a quorum
        that is gone), then each is waited for, SIGKILLed if it hangs."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            list(pool.map(self.stop_node, range(len(self.nodes))))


def sasl_properties(node: KafkaNode, sasl: Sasl) -> dict[str, str]:
    """The client listener with SASL/SCRAM, and ACLs enforced."""
    login = "org.apache.kafka.common.security.scram.ScramLoginModule required"
    jaas = f'{login} username="{sasl.admin}" password="{sasl.password}";'
    return {
        "listeners": f"SASL_PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
        "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{node.port}",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
        "sasl.enabled.mechanisms": SCRAM,
        "sasl.mechanism.inter.broker.protocol": SCRAM,
        "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": jaas,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{sasl.admin};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }


def node_properties(node: KafkaNode, voters: str, cluster_size: int, sasl: Sasl | None = None) -> dict[str, str]:
    replication = str(min(3, cluster_size))
    min_isr = "2" if cluster_size >= 3 else "1"
    return {
        **shared_properties(),
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(node.data_dir),
        "offsets.topic.replication.factor": replication,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min_isr,
        "default.replication.factor": replication,
        "min.insync.replicas": min_isr,
        **(sasl_properties(node, sasl) if sasl else {}),
    }


def start_kafka(count: int, state_dir: Path, log_dir: Path, nice: int = 0, sasl: Sasl | None = None) -> KafkaCluster:
    """Formats and starts `count` KRaft nodes on free loopback ports under `state_dir`;
    returns once all of them are in the metadata. Stops what it started on failure.
    With `sasl`, clients authenticate and ACLs apply (Sasl)."""
    libs = kafka_libs()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log4j = state_dir / "log4j2.yaml"
    log4j.write_text(LOG4J2)
    nodes = []
    for node_id in range(1, count + 1):
        folder = state_dir / f"node-{node_id}"
        shutil.rmtree(folder, ignore_errors=True)  # a fresh data folder per format
        folder.mkdir(parents=True)
        suffix = f"-{node_id}" if count > 1 else ""
        nodes.append(
            KafkaNode(
                node_id,
                free_port(),
                free_port(),
                folder / "data",
                folder / "server.properties",
                log_dir / f"kafka{suffix}.log",
            )
        )
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    cluster_id = _cluster_id()
    for node in nodes:
        props = node_properties(node, voters, count, sasl)
        node.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        _format(libs, node, cluster_id, log4j, sasl)
    cluster = KafkaCluster(nodes, libs, nice, log4j, sasl)
    try:
        for index in range(count):
            cluster.start_node(index, wait=False)
        for index in range(count):
            cluster.wait_listening(index)
        cluster.wait_for_metadata()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes in URL-safe base64 without padding (22 chars)."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _format(libs: Path, node: KafkaNode, cluster_id: str, log4j: Path, sasl: Sasl | None) -> None:
    # the admin's SCRAM credentials go into the metadata log with the format
    scram = ["--add-scram", f"{SCRAM}=[name={sasl.admin},password={sasl.password}]"] if sasl else []
    result = subprocess.run(
        [
            "java",
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{libs}/*",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",  # an id may start with "-"
            "-c",
            str(node.config),
            *scram,
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise DevStackError(f"formatting kafka node {node.node_id} failed:\n{(result.stdout + result.stderr)[-2000:]}")
