"""Processes of the dev stack and the tests: free loopback ports, spawning in a session
of their own, waiting for a condition with a timeout, stopping by process id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from streams.exceptions import TidegateError


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


def spawn(
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


def check_alive(proc: subprocess.Popen[bytes], what: str, log_path: Path) -> bool:
    if proc.poll() is not None:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise DevStackError(f"{what} exited with code {proc.returncode}:\n{tail}")
    return True


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


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log_path: Path, timeout_s: float) -> None:
    """Until `proc` accepts connections on 127.0.0.1:`port`; raises with the end of its
    log if it exits first, or naming `what` after `timeout_s`."""
    wait_until(lambda: check_alive(proc, what, log_path) and port_open(port), timeout_s, what, interval_s=0.1)
