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


# -- a fleet: `dev up --fleet FILE` starts each pool's workers (issue 26, item 6)

TWO_POOLS = """
models:
  talk: {token_budget: 1024}
  sim: {token_budget: 512}
pools:
  quick: {engine: echo, models: [talk], partitions: 4, replicas: 1}
  slow: {engine: "sim:5", models: [sim], partitions: 2, replicas: 1}
"""


def proc_env(pid: int) -> dict[str, str]:
    """A running process's environment, as it was started."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in raw if b"=" in entry)


def test_a_bad_fleet_file_is_a_line_per_mistake_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("models:\n  talk: {token_budget: 4}\npools:\n  quick: {engine: echo, models: [talk, nope]}\n")
    result = run(["dev", "up", "--fleet", str(bad)], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"tidegate: {bad}: ") for line in lines), result.stderr
    assert "models.talk.token_budget" in lines[0] and "'nope' is not in `models`" in lines[1]
    missing = run(["dev", "up", "--fleet", str(tmp_path / "none.yaml")], tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "cannot read it" in missing.stderr
    good = tmp_path / "good.yaml"
    good.write_text(TWO_POOLS)
    both = run(["dev", "up", "--fleet", str(good), "--workers", "2"], tmp_path)
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "replicas" in both.stderr
    assert not (tmp_path / ".tidegate").exists()  # nothing started, nothing written


def test_a_fleets_pools_are_roles_of_their_own_in_the_plan(tmp_path: Path) -> None:
    """Each pool's workers: role `worker.<pool>`, its log `inference.<pool>[-N]`, told
    its pool; the `default` pool keeps today's role and names."""
    from streams.config import Settings
    from tidegate.cli import _role_count
    from tidegate.devstack import DevStack, scale_arg, worker_counts
    from tidegate.supervisor import Plan

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(TWO_POOLS.replace("  slow:", "  default: {engine: echo, models: [talk]}\n  slow:"))
    counts = worker_counts(Settings(), str(fleet), workers=5)
    assert counts == {"worker.quick": 1, "worker": 1, "worker.slow": 1}
    fleet.write_text(TWO_POOLS.replace("replicas: 1}\n  slow", "replicas: 0}\n  slow"))
    assert worker_counts(Settings(), str(fleet), workers=5) == {"worker.quick": 0, "worker.slow": 1}
    assert worker_counts(Settings(), None, workers=3) == {"worker": 3}
    plan = Plan(env={}, log_dir=str(tmp_path), state_file="", counts={"monitor": 1, **counts, "worker.quick": 2})
    stages = {s.name: s for s in plan.make_stages()}
    assert list(stages) == ["ops", "inference", "inference.quick-1", "inference.quick-2", "inference.slow"]
    assert {name: s.env.get("TIDEGATE_POOL") for name, s in stages.items()} == {
        "ops": None,
        "inference": "default",
        "inference.quick-1": "quick",
        "inference.quick-2": "quick",
        "inference.slow": "slow",
    }
    assert {s.module for s in stages.values() if s.role.startswith("worker")} == {"inference"}
    assert _role_count("workers.quick=3") == ("worker.quick", 3) and _role_count("workers=2") == ("worker", 2)
    named = [scale_arg(r) for r in ("worker", "processor", "worker.slow")]
    assert named == ["workers=N", "processors=N", "workers.slow=N"]
    stack = DevStack("b", "r", fleet_file=str(fleet), pids={"worker": 1, "worker.slow": 2, "processor": 3})
    assert stack.pool_roles() == {"default": "worker", "slow": "worker.slow"}
    assert stack.env()["TIDEGATE_FLEET_FILE"] == str(fleet)
    assert "TIDEGATE_FLEET_FILE" not in DevStack("b", "r").env()  # without a fleet: as today


def test_dev_up_with_a_fleet_runs_each_pools_workers(tmp_path: Path) -> None:
    """Two pools (echo and sim:5 engines), one replica each: each pool's worker is up in
    its own group and answers its model; every process was told the fleet file; scale
    advise and the autoscaler see each pool; the pools scale apart; `dev down` stops
    everything."""
    import asyncio

    from confluent_kafka.admin import AdminClient

    from streams import Client
    from streams.config import Settings
    from streams.fleet import load_fleet

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(TWO_POOLS)
    # the fleet file's path relative (made absolute for the stages); the autoscaler beside
    # (its in-cooldown past the test: it scales nothing in while the test scales)
    up = run(["dev", "up", "--model", "echo", "--fleet", "fleet.yaml", "--autoscale", "--in-cooldown", "900"], tmp_path)
    state_file = tmp_path / ".tidegate" / "dev.json"
    state: dict = {}
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        assert state["fleet_file"] == str(fleet_file)
        stages = {"monitor", "processor", "worker.quick", "worker.slow"}
        assert set(state["pids"]) == {"broker", "redis", "supervisor", "autoscaler", *stages}
        assert set(state["metrics"]) == stages
        for role in ("supervisor", "autoscaler", *stages):
            env = proc_env(state["pids"][role])
            assert env.get("TIDEGATE_FLEET_FILE") == str(fleet_file), role
        assert proc_env(state["pids"]["worker.quick"])["TIDEGATE_POOL"] == "quick"
        assert proc_env(state["pids"]["worker.slow"])["TIDEGATE_POOL"] == "slow"
        autoscaler_log = (tmp_path / ".tidegate" / "logs" / "autoscaler.log").read_text()
        assert "workers.quick -> worker.quick, workers.slow -> worker.slow" in autoscaler_log

        settings = Settings(bootstrap=state["bootstrap"], redis_url=state["redis_url"], fleet_file=str(fleet_file))
        fleet = load_fleet(settings)
        admin = AdminClient({"bootstrap.servers": settings.bootstrap})

        def members(group: str) -> int:
            described = admin.describe_consumer_groups([group])[group].result(timeout=10)
            return len(described.members)

        for pool in fleet.pools.values():  # each pool's worker is a member of the pool's own group
            wait_for(lambda pool=pool: members(pool.group) == 1, 30, f"pool {pool.name}'s worker in {pool.group}")

        async def ask_each_model() -> dict[str, object]:
            async with Client(settings=settings, reply_grace_s=30) as client:
                asked = {model: [{"role": "user", "content": f"hi {model}"}] for model in ("talk", "sim")}
                return {model: await client.generate(m, f"s-{model}", model=model) for model, m in asked.items()}

        replies = asyncio.run(ask_each_model())
        for model, reply in replies.items():
            assert reply.ok and reply.model == model, (model, reply)  # type: ignore[attr-defined]
        assert "hi talk" in replies["talk"].text  # type: ignore[attr-defined]  # the echo pool answered it

        advice = run(["scale", "advise", "--json"], tmp_path)
        assert advice.returncode == 0, advice.stderr
        rows = {r["stage"]: r for r in json.loads(advice.stdout)}
        assert set(rows) == {"processors", "workers.quick", "workers.slow"}, rows
        assert rows["workers.quick"]["recommended"] == 1 and rows["workers.slow"]["recommended"] == 1, rows

        scaled = run(["dev", "scale", "workers.quick=2"], tmp_path)  # one pool scales alone
        assert scaled.returncode == 0, scaled.stderr
        state = json.loads(state_file.read_text())
        assert len(state["pids"]["worker.quick"]) == 2 and isinstance(state["pids"]["worker.slow"], int)
        assert run(["dev", "scale", "workers.nope=2"], tmp_path).returncode == 2  # not a pool it runs
        status = run(["dev", "status"], tmp_path)
        assert status.returncode == 0 and "worker.quick" in status.stdout and "worker.slow" in status.stdout
    finally:
        down = run(["dev", "down"], tmp_path)
    assert down.returncode == 0, down.stderr
    assert not state_file.exists()
    pids = [pid for found in state.get("pids", {}).values() for pid in (found if isinstance(found, list) else [found])]
    assert pids and not any(pid_alive(pid) for pid in pids)
