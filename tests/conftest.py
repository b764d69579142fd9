"""Real services for the tests: a broker and redis-server once per session, and
per-module pipelines (monitor, processor and worker processes) on fresh topic
prefixes. Everything started here is stopped here, by process id.

The broker is Apache Kafka (one KRaft node) unless TIDEGATE_TEST_BROKER=tansu;
`make test` runs the integration tests (those that use the services) on both.
Tests marked `kafka_only` need what Tansu lacks (durability, replication, kcat); tests
marked `same_on_any_broker` exercise nothing a broker does differently (Redis, the
model, codecs, HTTP) and run on Apache Kafka alone, to keep the Tansu rerun short."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from streams.config import Settings
from streams.kafka import create_topics
from streams.lifecycle import READY_MARKER
from tidegate import devstack
from tidegate.processes import free_port, stop_pid, wait_until
from tidegate.supervisor import STAGE_MODULES

LOG_DIR = Path(os.environ.get("TIDEGATE_TEST_LOGS", "/tmp/tidegate-test-logs"))
BROKER: devstack.Broker = "tansu" if os.environ.get("TIDEGATE_TEST_BROKER") == "tansu" else "kafka"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks tests that use a broker or Redis `integration`; skips `kafka_only` and
    `same_on_any_broker` ones on Tansu."""
    for item in items:
        if "services" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        if BROKER == "tansu" and item.get_closest_marker("kafka_only"):
            item.add_marker(pytest.mark.skip(reason="needs Apache Kafka"))
        elif BROKER == "tansu" and item.get_closest_marker("same_on_any_broker"):
            item.add_marker(pytest.mark.skip(reason="the same on either broker: run on Apache Kafka"))


@pytest.fixture(scope="session")
def services() -> Iterator[tuple[str, str]]:
    """(bootstrap, redis_url) of a fresh broker and redis-server on free loopback ports."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    brokers = devstack.start_brokers(BROKER, 1, LOG_DIR / f"kafka-{uuid.uuid4().hex[:6]}", LOG_DIR)
    redis_port = free_port()
    try:
        redis = devstack.start_redis(redis_port, LOG_DIR)
    except BaseException:
        brokers.stop()
        raise
    try:
        yield brokers.bootstrap, f"redis://127.0.0.1:{redis_port}/0"
    finally:
        stop_pid(redis.pid)
        brokers.stop()


SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def counter() -> TokenCounter:
    """The processors' token counter for the default model (the handler's tests)."""
    return TokenCounter(load_counting_tokenizer("default"))


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop a test drives the async handler with."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="session")
def settings_factory(services: tuple[str, str]) -> SettingsFactory:
    """Settings on a fresh topic prefix and fresh group ids, topics created."""
    bootstrap, redis_url = services

    def make(**overrides: object) -> Settings:
        tag = uuid.uuid4().hex[:8]
        fields: dict[str, object] = {
            "bootstrap": bootstrap,
            "redis_url": redis_url,
            "broker": BROKER,
            "topic_prefix": f"t{tag}.",
            "processor_group": f"processors-{tag}",
            "worker_group": f"workers-{tag}",
            **overrides,
        }
        settings = Settings(**fields)  # type: ignore[arg-type]
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
        self.exit_codes: dict[str, int] = {}

    def start(self, roles: tuple[str, ...] = tuple(STAGE_MODULES), extra_env: dict[str, str] | None = None) -> None:
        """Starts the given roles (monitor, processor, worker) and waits until each is
        ready; `extra_env` goes to these roles only (e.g. TIDEGATE_FAULTS). A role
        with a suffix (`worker-2`) is one more process of its stage."""
        env = {**settings_env(self.settings), **(extra_env or {})}
        procs = {}
        for role in roles:
            module = STAGE_MODULES[role.split("-")[0]]  # "worker-2": a second worker
            name = role if "-" in role else module
            log_path = self.log_dir / f"{name}.log"
            log_path.unlink(missing_ok=True)
            procs[role] = (devstack.start_stage(module, env, self.log_dir, name=name), log_path)
            self.pids[role] = procs[role][0].pid
        for proc, log_path in procs.values():
            devstack.wait_for_ready(log_path, READY_MARKER, proc, 120)

    def wait_exited(self, role: str, timeout_s: float) -> int:
        """Waits until the role's process is gone (a fault point killed it); its exit code."""
        pid = self.pids[role]

        def exited() -> bool:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.exit_codes[role] = os.waitstatus_to_exitcode(status)
            return bool(done)

        wait_until(exited, timeout_s, f"{role} (pid {pid}) to exit")
        del self.pids[role]
        return self.exit_codes[role]

    def stop(self, roles: tuple[str, ...] | None = None) -> None:
        stop_all([pid for role in list(roles or self.pids) if (pid := self.pids.pop(role, None)) is not None])


def stop_all(pids: list[int]) -> None:
    """Stops the processes at once, not one after another: each takes seconds to leave
    its group and commit (module teardowns took 8-16 s one by one)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, len(pids))) as pool:
        list(pool.map(stop_pid, pids))


@pytest.fixture(scope="module")
def pipeline_factory(
    settings_factory: SettingsFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Pipeline]]:
    started: list[Pipeline] = []

    def make(roles: tuple[str, ...] = tuple(STAGE_MODULES), **overrides: object) -> Pipeline:
        settings = settings_factory(**overrides)
        log_dir = LOG_DIR / f"{request.module.__name__}-{settings.topic_prefix.rstrip('.')}"
        pipeline = Pipeline(settings, log_dir)
        started.append(pipeline)
        pipeline.start(roles)
        return pipeline

    yield make
    stop_all([pid for pipeline in started for pid in pipeline.pids.values()])
    for pipeline in started:
        pipeline.pids.clear()


@pytest.fixture(scope="module")
def echo_pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    # functional tests: caps far above their traffic (backpressure has its own tests)
    return pipeline_factory(model="echo", max_prompt_chars=2000, workers_cap_messages=10_000)
