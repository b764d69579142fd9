"""What operators read, on the real broker: the lag monitor's health by Burrow's
rules per partition, its lag in seconds, and its Prometheus endpoint."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.conftest import Pipeline
from tests.helpers import wait_for
from tidegate.processes import free_port, spawn, stop_pid

WINDOW_S = 3.0
TICK_S = 0.5


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and "}" in line:
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == wanted:
                return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.kafka_only
def test_each_burrow_status_is_produced_on_the_real_broker(pipeline_factory: Callable[..., Pipeline]) -> None:
    """Five partitions of the workers' topic, five group behaviours, committed by hand
    (no worker runs): OK, WARN, STALL, STOP and REWIND, read from the monitor's metrics."""
    port = free_port()
    pipeline = pipeline_factory(roles=(), health_window_s=WINDOW_S, workers_cap_messages=10_000)
    settings = pipeline.settings
    topic = settings.topics.contexts
    producer = Producer({"bootstrap.servers": settings.bootstrap})

    def produce(partition: int, n: int) -> None:
        for _ in range(n):
            producer.produce(topic, b"x", partition=partition)
        assert producer.flush(10) == 0

    for partition, n in {0: 10, 1: 5, 2: 10, 3: 10, 4: 20}.items():
        produce(partition, n)
    committer = Consumer({"bootstrap.servers": settings.bootstrap, "group.id": settings.worker_group})
    offsets = {0: 10, 1: 1, 2: 2, 3: 1, 4: 15}

    def commit(partitions: list[int]) -> None:
        committer.commit(offsets=[TopicPartition(topic, p, offsets[p]) for p in partitions], asynchronous=False)

    commit([0, 1, 2, 3, 4])  # partition 3 never commits again: STOP
    pipeline.start(("monitor",), extra_env={"TIDEGATE_METRICS_PORT": str(port)})
    stop = threading.Event()

    def behave() -> None:
        ticks = 0
        while not stop.wait(TICK_S):
            ticks += 1
            produce(1, 3)  # WARN: commits move by one, the lag grows by two a tick
            offsets[1] += 1
            if ticks == 4:
                offsets[4] = 10  # REWIND: back from 15 to 10
            commit([1, 2, 4])  # STALL: partition 2 commits offset 2 again and again

    thread = threading.Thread(target=behave, daemon=True)
    thread.start()
    expected = {0: "OK", 1: "WARN", 2: "STALL", 3: "STOP", 4: "REWIND"}

    def statuses() -> dict[int, str] | None:
        text = scrape(port)
        found = {}
        for partition in expected:
            for status in ("OK", "WARN", "STALL", "STOP", "REWIND"):
                if (
                    sample(text, "tidegate_partition_status", stage="workers", partition=str(partition), status=status)
                    == 1
                ):
                    found[partition] = status
        return found if found == expected else None

    try:
        # the rewind happens at 2 s and stays in the window until 5 s
        wait_for(statuses, 10, f"partition statuses {expected}")
        text = scrape(port)
        assert sample(text, "tidegate_stage_status", stage="workers") == 2  # ERR
        assert (sample(text, "tidegate_lag_seconds", stage="workers") or 0) > 0
        assert sample(text, "tidegate_lag_messages", stage="workers", partition="3") == 9
    finally:
        stop.set()
        thread.join(5)
        committer.close()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Prometheus is not installed (make setup installs it)")
def test_prometheus_scrapes_the_monitor_and_answers_a_lag_query(
    pipeline_factory: Callable[..., Pipeline], tmp_path: Path
) -> None:
    """Debian's Prometheus server, scraping a monitor on loopback, answers a query for
    the workers' lag with the lag the monitor measured."""
    port, prometheus_port = free_port(), free_port()
    pipeline = pipeline_factory(roles=(), workers_cap_messages=10_000)
    producer = Producer({"bootstrap.servers": pipeline.settings.bootstrap})
    for _ in range(7):
        producer.produce(pipeline.settings.topics.contexts, b"x", partition=0)
    assert producer.flush(10) == 0
    pipeline.start(("monitor",), extra_env={"TIDEGATE_METRICS_PORT": str(port)})
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tidegate\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    server = spawn(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        tmp_path / "prometheus.log",
    )
    query = 'sum(tidegate_lag_messages{stage="workers"})'
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query={urllib.parse.quote(query)}"

    def lag_from_prometheus() -> float | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                result = json.loads(response.read())["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        assert wait_for(lambda: lag_from_prometheus() == 7, 60, "Prometheus to report the workers' lag of 7")
    finally:
        stop_pid(server.pid)
