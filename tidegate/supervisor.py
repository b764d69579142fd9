"""The dev stack's supervisor: starts the stages as its children, restarts one that
died, and stops them all gracefully.

`tidegate dev up` runs it as its own process (`python -m tidegate.supervisor PLAN`),
after the brokers and Redis. It starts every stage of the plan, records their
process ids in the dev stack's state file (.tidegate/dev.json, under `pids`), and
prints the readiness marker once every stage is ready. A stage that exits is
started again after a backoff (1 s, doubling up to 30 s, back to 1 s once a stage
stayed up a minute), with one log line saying which stage, its exit code and the
last line of its log. SIGHUP makes it read the plan again and start or stop stages
until each role has the plan's count (`tidegate dev scale workers=N`). SIGTERM stops
the stages (SIGTERM, then SIGKILL after their grace) and then the supervisor.

A fleet's pools (`dev up --fleet FILE`, streams/fleet.py) are roles of their own:
`worker.<pool>` runs `inference` with TIDEGATE_POOL=<pool> (the worker reads its
topic, group and engine from the fleet), logs as `inference.<pool>`, and scales
alone (`dev scale workers.<pool>=N`). The `default` pool's role stays `worker`, as
without a fleet file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from streams.fleet import DEFAULT_POOL
from streams.lifecycle import READY_MARKER, announce_ready, stop_on_signals
from tidegate.processes import DevStackError, free_port, spawn, stop_pid

log = logging.getLogger("tidegate.supervisor")

# role -> module run as `python -m MODULE`; each prints READY_MARKER once it has joined
STAGE_MODULES = {"monitor": "ops", "processor": "processors", "worker": "inference"}
WORKER = "worker"
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a stage up this long starts its backoff over
STOP_GRACE_S = 15.0
POLL_S = 0.2


def pool_role(pool: str) -> str:
    """The role of a pool's workers: `worker` for the `default` pool (today's role, which
    `dev scale workers=N` and the autoscaler keep acting on), `worker.<pool>` for others."""
    return WORKER if pool == DEFAULT_POOL else f"{WORKER}.{pool}"


def role_pool(role: str) -> str | None:
    """The pool a workers' role serves (`default` for `worker`); None for other roles."""
    kind, _, pool = role.partition(".")
    if kind != WORKER:
        return None
    return pool or DEFAULT_POOL


def role_module(role: str) -> str:
    """The module a role runs: `worker.<pool>` runs the workers' module."""
    return STAGE_MODULES[role.partition(".")[0]]


def role_base_name(role: str) -> str:
    """A role's log name before any `-N`: `inference`, or `inference.<pool>` for a pool."""
    module = role_module(role)
    pool = role_pool(role)
    return module if pool in (None, DEFAULT_POOL) else f"{module}.{pool}"


def ordered_roles(roles: Iterable[str]) -> list[str]:
    """`roles` in starting order: monitor, processors, workers, then the pools' workers
    (in the order given: the fleet file's)."""
    given = list(dict.fromkeys(roles))
    return [r for r in STAGE_MODULES if r in given] + [r for r in given if r not in STAGE_MODULES]


@dataclass
class Stage:
    """One stage process the supervisor keeps running."""

    role: str
    name: str  # log file name, e.g. inference-2
    module: str
    nice: int
    metrics_port: int = 0  # its Prometheus endpoint, the same across restarts
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # its own settings on top of the plan's (TIDEGATE_POOL)


@dataclass
class Plan:
    """What to run: written by `dev up`, read by the supervisor."""

    env: dict[str, str]
    log_dir: str
    state_file: str
    counts: dict[str, int]
    nice: int = 0
    ready_timeout_s: float = 180.0
    stages: list[Stage] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Plan:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        fields = {k: v for k, v in self.__dict__.items() if k != "stages"}
        path.write_text(json.dumps(fields, indent=2) + "\n")

    def make_stages(self) -> list[Stage]:
        stages = []
        for role in ordered_roles(self.counts):
            count, base = self.counts[role], role_base_name(role)
            for n in range(count):
                name = base if count == 1 else f"{base}-{n + 1}"
                stages.append(self.stage(role, name))
        return stages

    def stage(self, role: str, name: str) -> Stage:
        """A stage of `role`; workers run at normal priority (they stand in for the
        accelerator) and are told their pool."""
        pool = role_pool(role)
        env = {"TIDEGATE_POOL": pool} if pool is not None else {}
        return Stage(role, name, role_module(role), 0 if pool is not None else self.nice, free_port(), env=env)


class Supervisor:
    def __init__(self, plan: Plan, plan_path: Path | None = None) -> None:
        self.plan = plan
        self.plan_path = plan_path
        self.reload = threading.Event()
        self.log_dir = Path(plan.log_dir)
        self.stages = plan.make_stages()
        self.stopping = threading.Event()

    def start(self, stage: Stage) -> None:
        env = {**self.plan.env, **stage.env, "TIDEGATE_METRICS_PORT": str(stage.metrics_port)}
        stage.proc = spawn([sys.executable, "-m", stage.module], self.log_dir / f"{stage.name}.log", env, stage.nice)
        stage.started_at = time.monotonic()
        stage.restart_at = None

    def run(self) -> None:
        for stage in self.stages:
            self.start(stage)
        self.record_pids()
        try:
            self.wait_ready()
        except DevStackError as exc:
            log.error("%s", exc)
            self.stop()
            sys.exit(1)
        announce_ready()
        while not self.stopping.wait(POLL_S):
            if self.reload.is_set():
                self.reload.clear()
                self.rescale()
            self.watch()
        self.stop()

    def rescale(self) -> None:
        """Starts or stops stages until every role has the count the plan file now says;
        the newest stages of a role go first."""
        if self.plan_path is None:
            return
        self.plan = Plan.load(self.plan_path)
        for role in ordered_roles(self.plan.counts):
            base = role_base_name(role)
            mine = [s for s in self.stages if s.role == role]
            wanted = self.plan.counts.get(role, len(mine))
            for stage in mine[wanted:][::-1]:
                log.warning("stage=%s scaling in", stage.name)
                self.stages.remove(stage)
                if stage.proc is not None:
                    threading.Thread(target=stop_pid, args=(stage.proc.pid, STOP_GRACE_S), daemon=True).start()
            taken = {s.name for s in self.stages}
            for _ in range(wanted - len(mine)):
                n = 1 + len([s for s in self.stages if s.role == role])
                while (name := f"{base}-{n}") in taken or (n == 1 and base in taken):
                    n += 1
                stage = self.plan.stage(role, name)
                log.warning("stage=%s scaling out", stage.name)
                self.start(stage)
                self.stages.append(stage)
                taken.add(name)
        self.record_pids()

    def wait_ready(self) -> None:
        """Until every stage printed its readiness marker; a stage that exits before it
        is not restarted but fails the start, with the end of its log."""
        deadline = time.monotonic() + self.plan.ready_timeout_s
        pending = list(self.stages)
        while pending and not self.stopping.is_set():
            for stage in list(pending):
                assert stage.proc is not None
                log_path = self.log_dir / f"{stage.name}.log"
                if stage.proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                    raise DevStackError(f"{stage.name} exited with code {stage.proc.returncode}:\n{tail}")
                if READY_MARKER in log_path.read_text(errors="replace"):
                    pending.remove(stage)
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise DevStackError(f"timed out after {self.plan.ready_timeout_s:.0f}s waiting for {names}")
            time.sleep(0.1)

    def watch(self) -> None:
        """Restarts the stages that exited, each after its backoff."""
        now = time.monotonic()
        changed = False
        for stage in self.stages:
            if stage.restart_at is not None:
                if now >= stage.restart_at:
                    stage.restarts += 1
                    log.warning("stage=%s restart=%d starting again", stage.name, stage.restarts)
                    self.start(stage)
                    changed = True
                continue
            code = stage.proc.poll() if stage.proc is not None else None
            if code is None:
                continue
            if now - stage.started_at >= STABLE_S:
                stage.backoff_s = BACKOFF_FIRST_S
            stage.restart_at = now + stage.backoff_s
            log.warning(
                "stage=%s exited code=%s; restarting in %.0fs; its log ends: %s",
                stage.name,
                code,
                stage.backoff_s,
                _last_line(self.log_dir / f"{stage.name}.log"),
            )
            stage.backoff_s = min(BACKOFF_MAX_S, stage.backoff_s * 2)
        if changed:
            self.record_pids()

    def record_pids(self) -> None:
        """The stages' current pids into the state file's `pids`, and their metrics
        endpoints under `metrics`, atomically."""
        path = Path(self.plan.state_file)
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        for role in ordered_roles([*(s.role for s in self.stages), *self.plan.counts]):
            pids = [s.proc.pid for s in self.stages if s.role == role and s.proc is not None]
            if pids:
                state["pids"][role] = pids if len(pids) > 1 else pids[0]
            urls = [f"http://127.0.0.1:{s.metrics_port}/metrics" for s in self.stages if s.role == role]
            if urls:
                state.setdefault("metrics", {})[role] = urls if len(urls) > 1 else urls[0]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    def stop(self) -> None:
        """Workers and processors get SIGTERM and their grace, all at once."""
        from concurrent.futures import ThreadPoolExecutor

        running = [s.proc.pid for s in self.stages if s.proc is not None and s.proc.poll() is None]
        with ThreadPoolExecutor(max(1, len(running))) as pool:
            list(pool.map(lambda pid: stop_pid(pid, STOP_GRACE_S), running))


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][-300:] if lines else "(empty log)"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    plan_path = Path(sys.argv[1])
    supervisor = Supervisor(Plan.load(plan_path), plan_path)
    stop_on_signals(supervisor.stopping)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: supervisor.reload.set())
    supervisor.run()


if __name__ == "__main__":
    main()
