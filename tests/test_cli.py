"""The `tidegate` command: dev up / send / down, and clear one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers import wait_for

TIDEGATE = [sys.executable, "-m", "tidegate.cli"]
OPERATOR_METRICS = ("tidegate_lag_messages", "tidegate_lag_seconds", "tidegate_stage_status", "tidegate_refusals_total")


def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([*TIDEGATE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_bad_flag_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = run(["bench", "nonsense"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'nonsense'" in result.stderr
    result = run(["bench", "batching", "--fetch-wait-ms", "25,0"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "positive integers, got '25,0'" in result.stderr
    result = run(["send", "hi"], tmp_path)  # no dev stack running here
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "dev up" in result.stderr


def test_dev_up_send_down(tmp_path: Path) -> None:
    up = run(["dev", "up", "--model", "echo"], tmp_path)
    state_file = tmp_path / ".tidegate" / "dev.json"
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        assert set(state["pids"]) == {"broker", "redis", "supervisor", "monitor", "processor", "worker"}
        assert state["broker"] == "kafka"
        assert state["bootstrap"].startswith("127.0.0.1:") and state["redis_url"].startswith("redis://127.0.0.1:")
        sent = run(["send", "ping over kafka", "--max-new-tokens", "8"], tmp_path)
        assert sent.returncode == 0, sent.stderr
        assert "[ok]" in sent.stdout and "ping over kafka" in sent.stdout
        lag = run(["lag", "--json"], tmp_path)
        assert lag.returncode == 0, lag.stderr
        rows = {row["stage"]: row for row in json.loads(lag.stdout)}
        assert set(rows) == {"processors", "workers"}
        assert rows["workers"]["lag"] == 0 and rows["workers"]["committed"] == 1  # answered and committed
        assert rows["workers"]["state"] == "ok" and rows["workers"]["cap"] > 0
        assert rows["workers"]["health"] == "OK" and rows["workers"]["partitions"] == 8

        # every process answers /metrics with the operators' four metrics
        assert set(state["metrics"]) == {"monitor", "processor", "worker"}
        for role, url in state["metrics"].items():
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            for name in OPERATOR_METRICS:
                assert f"# TYPE {name} " in text, (role, name)
        advice = run(["scale", "advise", "--json"], tmp_path)
        assert advice.returncode == 0, advice.stderr
        assert {r["stage"]: r["recommended"] for r in json.loads(advice.stdout)} == {"processors": 1, "workers": 1}

        # the workers' group scales out and in, and keeps serving
        scaled = run(["dev", "scale", "workers=2"], tmp_path)
        assert scaled.returncode == 0, scaled.stderr
        assert len(json.loads(state_file.read_text())["pids"]["worker"]) == 2
        assert len(json.loads(state_file.read_text())["metrics"]["worker"]) == 2
        assert run(["dev", "scale", "workers=1"], tmp_path).returncode == 0
        state = json.loads(state_file.read_text())
        assert isinstance(state["pids"]["worker"], int)
        assert run(["dev", "scale", "monitors=3"], tmp_path).returncode == 2  # one line, no traceback

        # a stage that dies is started again by the supervisor, and serves
        os.kill(state["pids"]["worker"], signal.SIGKILL)
        restarted = wait_for(
            lambda: (pid := json.loads(state_file.read_text())["pids"]["worker"]) != state["pids"]["worker"] and pid,
            30,
            "the supervisor to restart the worker",
        )
        again = run(["send", "after a restart", "--max-new-tokens", "8"], tmp_path)
        assert again.returncode == 0 and "after a restart" in again.stdout, again.stderr
        assert pid_alive(restarted)
        state = json.loads(state_file.read_text())
        supervisor_log = (tmp_path / ".tidegate" / "logs" / "supervisor.log").read_text()
        assert "exited code=-9; restarting" in supervisor_log
    finally:
        down = run(["dev", "down"], tmp_path)
    assert down.returncode == 0, down.stderr
    assert not state_file.exists()
    assert not any(pid_alive(pid) for pid in state["pids"].values())
