"""Real services for the tests: the embedded broker and redis-server once per session,
and per-module pipelines (processor + worker processes) on fresh topic prefixes.
Everything started here is stopped here, by process id."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.config import Settings
from streams.kafka import create_topics
from tidegate import devstack

LOG_DIR = Path(os.environ.get("TIDEGATE_TEST_LOGS", "/tmp/tidegate-test-logs"))


@pytest.fixture(scope="session")
def services() -> Iterator[tuple[str, str]]:
    """(bootstrap, redis_url) of a fresh broker and redis-server on free loopback ports."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    bport, rport = devstack.free_port(), devstack.free_port()
    broker = devstack.start_broker(bport, LOG_DIR)
    try:
        redis = devstack.start_redis(rport, LOG_DIR)
    except BaseException:
        devstack.stop_pid(broker.pid)
        raise
    try:
        yield f"127.0.0.1:{bport}", f"redis://127.0.0.1:{rport}/0"
    finally:
        devstack.stop_pid(redis.pid)
        devstack.stop_pid(broker.pid)


SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def settings_factory(services: tuple[str, str]) -> SettingsFactory:
    """Settings on a fresh topic prefix and fresh group ids, topics created."""
    bootstrap, redis_url = services

    def make(**overrides: object) -> Settings:
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            bootstrap=bootstrap,
            redis_url=redis_url,
            topic_prefix=f"t{tag}.",
            processor_group=f"processors-{tag}",
            worker_group=f"workers-{tag}",
            **overrides,  # type: ignore[arg-type]
        )
        create_topics(settings)
        return settings

    return make


def settings_env(settings: Settings) -> dict[str, str]:
    return {
        f"TIDEGATE_{name.upper()}": str(value) for name, value in settings.model_dump().items() if value is not None
    }


class Pipeline:
    """The lag monitor, one processor and one worker process for a settings object."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.pids: dict[str, int] = {}

    def start(self, roles: tuple[str, ...] = tuple(devstack.STAGE_MODULES)) -> None:
        """Starts the given roles (monitor, processor, worker) and waits until each is ready."""
        env = settings_env(self.settings)
        procs = {}
        for role in roles:
            module = devstack.STAGE_MODULES[role]
            log_path = self.log_dir / f"{module}.log"
            log_path.unlink(missing_ok=True)
            procs[role] = devstack.start_stage(module, env, self.log_dir)
            self.pids[role] = procs[role].pid
        for role, proc in procs.items():
            log_path = self.log_dir / f"{devstack.STAGE_MODULES[role]}.log"
            devstack.wait_for_ready(log_path, devstack.READY_MARKER, proc, 120)

    def stop(self, roles: tuple[str, ...] | None = None) -> None:
        for role in list(roles or self.pids):
            pid = self.pids.pop(role, None)
            if pid is not None:
                devstack.stop_pid(pid)


@pytest.fixture(scope="module")
def pipeline_factory(
    settings_factory: SettingsFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Pipeline]]:
    started: list[Pipeline] = []

    def make(roles: tuple[str, ...] = tuple(devstack.STAGE_MODULES), **overrides: object) -> Pipeline:
        settings = settings_factory(**overrides)
        log_dir = LOG_DIR / f"{request.module.__name__}-{settings.topic_prefix.rstrip('.')}"
        pipeline = Pipeline(settings, log_dir)
        started.append(pipeline)
        pipeline.start(roles)
        return pipeline

    yield make
    for pipeline in started:
        pipeline.stop()


@pytest.fixture(scope="module")
def echo_pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    # functional tests: caps far above their traffic (backpressure has its own tests)
    return pipeline_factory(model="echo", max_prompt_chars=2000, workers_cap_messages=10_000)
