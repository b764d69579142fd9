"""Apache Kafka under the pipeline: a broker restarted under load, one broker of three
killed under load, and a foreign client (Debian's kcat) speaking JSON to the stack.

Each durability test starts its own brokers (the session broker stays untouched),
its own redis-server and a pipeline (monitor, processor, echo worker), sends a
bounded stream of requests, hurts the broker midway, and checks that every
accepted request is answered exactly once as the caller sees it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import orjson
import pytest

from streams import Client, Reply, Settings
from streams.kafka import create_topics
from tests.conftest import LOG_DIR, Pipeline
from tests.helpers import Outcome, fault_summary, load_through, lost, wait_for
from tidegate import devstack
from tidegate.kafka_broker import KafkaCluster
from tidegate.processes import free_port, stop_pid

pytestmark = pytest.mark.kafka_only

RATE_PER_S = 40  # requests offered per second while the broker is hurt
LOAD_S = 8.0


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def own_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[[int], tuple[KafkaCluster, Pipeline]]]:
    """A factory: N Kafka nodes, a redis-server and a pipeline on them, all stopped after."""
    stops: list[Callable[[], None]] = []

    def make(nodes: int) -> tuple[KafkaCluster, Pipeline]:
        tag = uuid.uuid4().hex[:6]
        log_dir = LOG_DIR / f"{request.node.name}-{tag}"
        brokers = devstack.start_brokers("kafka", nodes, log_dir / "state", log_dir)
        stops.append(brokers.stop)
        redis_port = free_port()
        redis = devstack.start_redis(redis_port, log_dir)
        stops.append(lambda: stop_pid(redis.pid))
        settings = Settings(
            bootstrap=brokers.bootstrap,
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            model="echo",
            workers_cap_messages=10_000,
            processors_cap_messages=10_000,
        )
        create_topics(settings)
        pipeline = Pipeline(settings, log_dir)
        stops.append(pipeline.stop)
        pipeline.start()
        assert isinstance(brokers.cluster, KafkaCluster)
        return brokers.cluster, pipeline

    yield make
    for stop in reversed(stops):
        stop()


async def one_request(settings: Settings, text: str) -> Reply:
    """After the fault: the stack keeps serving."""
    async with Client(settings=settings) as client:
        return await client.generate(user(text), "after", max_new_tokens=8, deadline_s=60)


def check_every_request_answered(outcomes: list[Outcome]) -> None:
    assert len(outcomes) >= RATE_PER_S * LOAD_S * 0.9
    assert lost(outcomes) == 0, [o.text for o in outcomes if o.reply is None or not o.reply.ok][:5]


def test_a_broker_restart_under_load_loses_nothing(own_cluster: Callable[[int], tuple[KafkaCluster, Pipeline]]) -> None:
    cluster, pipeline = own_cluster(1)

    def restart() -> None:
        cluster.stop_node(0)
        cluster.start_node(0)

    outcomes, recovery_s = load_through(pipeline.settings, "restart", restart, LOAD_S, RATE_PER_S)
    check_every_request_answered(outcomes)
    fault_summary("broker restarted", outcomes, recovery_s, pipeline.settings)
    after = asyncio.run(one_request(pipeline.settings, "after the restart"))
    assert after.ok and after.text == "after the restart"


def test_one_broker_of_three_killed_under_load_loses_nothing(
    own_cluster: Callable[[int], tuple[KafkaCluster, Pipeline]],
) -> None:
    cluster, pipeline = own_cluster(3)

    def kill() -> None:
        cluster.stop_node(1, kill=True)  # SIGKILL

    outcomes, recovery_s = load_through(pipeline.settings, "kill1of3", kill, LOAD_S, RATE_PER_S)
    check_every_request_answered(outcomes)
    fault_summary("one broker of three killed", outcomes, recovery_s, pipeline.settings)
    after = asyncio.run(one_request(pipeline.settings, "two of three"))
    assert after.ok and after.text == "two of three"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (make setup installs it)")
def test_kcat_produces_a_json_request_and_reads_the_json_reply(echo_pipeline: Pipeline) -> None:
    """A foreign client (Debian's kcat, librdkafka 2.0) speaks to the stack in JSON."""
    settings = echo_pipeline.settings
    request_id = f"kcat-{uuid.uuid4().hex}"
    body = {
        "request_id": request_id,
        "session_id": "kcat-session",
        "messages": [{"role": "user", "content": "hello from kcat"}],
        "reply_to": settings.topics.replies,
        "max_new_tokens": 8,
    }
    produced = subprocess.run(
        [
            "kcat",
            "-b",
            settings.bootstrap,
            "-P",
            "-t",
            settings.topics.requests,
            "-k",
            "kcat-session",
            "-H",
            "content-type=application/json",
        ],
        input=orjson.dumps(body),
        capture_output=True,
        timeout=30,
    )
    assert produced.returncode == 0, produced.stderr.decode()

    def read_reply() -> dict | None:
        consumed = subprocess.run(
            [
                "kcat",
                "-b",
                settings.bootstrap,
                "-C",
                "-t",
                settings.topics.replies,
                "-o",
                "beginning",
                "-e",
                "-q",
                "-f",
                "%k\t%h\t%s\n",
            ],
            capture_output=True,
            timeout=30,
        )
        for line in consumed.stdout.decode().splitlines():
            key, headers, value = line.split("\t", 2)
            if key == request_id:
                assert "content-type=application/json" in headers
                return orjson.loads(value)
        return None

    reply = wait_for(read_reply, 30, "the JSON reply, read by kcat")
    assert reply["status"] == "ok" and reply["text"] == "hello from kcat"
