"""The lag monitor: measures each stage's lag and publishes a PressureState per stage.

Runs as its own process (`tidegate monitor`, started by `dev up`), one per
deployment; a second one only publishes the same states twice. It publishes every
`pressure_interval_ms` while anything moves (a log end or a commit), and at least
once a second otherwise: on Tansu every publish is a record batch on
the pressure topic's one partition (about 5 a second under load, 1 when idle).

Each state also carries what operators read (`tidegate lag`, `tidegate scale
advise`, Prometheus on `METRICS_PORT`): lag in seconds (exact and interpolated),
the group's health by Burrow's rules (ops/burrow.py, from the commit log on Apache
Kafka), the arrival rate, and the group's members against the topic's partitions.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaException, Producer

from ops.burrow import OK, REWIND, STAGE_CODES, STALL, STOP, WARN, GroupHealth
from ops.commit_log import CommitLog
from ops.scaling import drain_time_s
from schemas import AVRO, content_type_header, get_codec
from streams import metrics
from streams.config import Settings
from streams.exceptions import TidegateError
from streams.kafka import admin_client, producer_config
from streams.lag import LagReader, Stage, StageLag, pipeline_stages
from streams.lifecycle import announce_ready, stop_on_signals
from streams.pressure import PressureGauge, stage_caps

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
RETRY_MAX_S = 5.0


class LagMonitor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stages = pipeline_stages(settings)
        self.reader = LagReader(settings, self.stages)
        caps = stage_caps(settings)
        self.gauges = {s.name: PressureGauge(s.name, caps[s.name], settings.warn_ratio) for s in self.stages}
        self.health = {s.name: GroupHealth(settings.health_window_s) for s in self.stages}
        self.arrivals = {s.name: RateMeter() for s in self.stages}
        self.commit_log = CommitLog(settings, {s.group for s in self.stages})
        self.members = GroupMembers(settings, self.stages)
        self.producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self.codec = get_codec()
        self.stopping = threading.Event()

    def sample(self) -> tuple[list[dict], tuple[int, ...]]:
        """One measurement of every stage: PressureState records, and a signature
        (log ends and commits) that changes whenever anything moved."""
        self.reader.poll(0)
        self.commit_log.poll()
        now = time.time()
        states, signature = [], []
        for stage in self.stages:
            lag = self.reader.lag(stage)
            state = self.gauges[stage.name].update(lag.lag, lag.committed)
            states.append(self._operators_view(stage, lag, state, now))
            signature += [lag.log_end, lag.committed]
        return states, tuple(signature)

    def _operators_view(self, stage: Stage, lag: StageLag, state: dict[str, Any], now: float) -> dict[str, Any]:
        """Adds lag seconds, health, arrival rate and members to a stage's state, and
        sets its Prometheus gauges."""
        commit_times = {
            p: ms / 1000
            for (group, topic, p), ms in self.commit_log.last_commit_ms.items()
            if group == stage.group and topic == stage.topic
        }
        health = self.health[stage.name]
        health.add(
            now,
            {p: pl.committed for p, pl in lag.partitions.items()},
            {p: pl.lag for p, pl in lag.partitions.items()},
            commit_times if self.commit_log.available else None,
        )
        statuses = health.statuses(now)
        arrival = self.arrivals[stage.name].update(lag.log_end, now)
        members = self.members.count(stage)
        state.update(
            lag_seconds=round(lag.lag_seconds, 3),
            lag_seconds_interpolated=round(lag.lag_seconds_interpolated, 3),
            health=health.stage_status(now),
            partition_health={str(p): status for p, status in statuses.items()},
            arrival_rate=round(arrival, 3),
            members=members,
            partitions=self.reader.partition_count(stage),
        )
        export(state, lag, statuses)
        return state

    def publish(self, states: list[dict]) -> None:
        for state in states:
            self.producer.produce(
                self.settings.topics.pressure,
                self.codec.encode("PressureState", state),
                state["stage"].encode(),
                headers=[content_type_header(AVRO)],
            )
        self.producer.flush(5)

    def run(self) -> None:
        interval = self.settings.pressure_interval_ms / 1000
        last_signature: tuple[int, ...] = ()
        last_sent = 0.0
        announced = False
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                states, signature = self.sample()
            except (KafkaException, TidegateError) as exc:
                # a broker restarting, or its group coordinator still loading: wait and
                # measure again; the states go stale for readers meanwhile, never wrong
                failures += 1
                log.warning("attempt=%d lag not measured, retrying: %s", failures, exc)
                self.stopping.wait(min(RETRY_MAX_S, interval * 2 ** min(failures, 5)))
                continue
            if failures:
                log.warning("lag measured again after %d failed attempts", failures)
                failures = 0
            if signature != last_signature or started - last_sent >= HEARTBEAT_S:
                self.publish(states)
                last_signature, last_sent = signature, started
                if not announced:
                    announced = True
                    announce_ready()
            # tail the topics until the next sample: keeps the log ends current
            self.reader.poll(max(0.0, interval - (time.monotonic() - started)))
        self.reader.close()
        self.commit_log.close()
        self.producer.flush(5)


class RateMeter:
    """Messages per second from a growing total, smoothed over a few seconds."""

    def __init__(self, smoothing_s: float = 5.0) -> None:
        self.smoothing_s = smoothing_s
        self.rate = 0.0
        self._last: tuple[float, int] | None = None

    def update(self, total: int, now: float) -> float:
        if self._last is not None and now > self._last[0]:
            elapsed = now - self._last[0]
            instant = max(0, total - self._last[1]) / elapsed
            weight = min(1.0, elapsed / self.smoothing_s)
            self.rate += weight * (instant - self.rate)
        self._last = (now, total)
        return self.rate


class GroupMembers:
    """Members of each stage's group (DescribeGroups), asked at most every few seconds;
    -1 where the broker does not say (Tansu lists no members)."""

    EVERY_S = 5.0

    def __init__(self, settings: Settings, stages: list[Stage]) -> None:
        self._known = settings.broker == "kafka"
        self._admin = admin_client(settings)
        self._counts: dict[str, int] = {s.name: -1 for s in stages}
        self._asked_at = 0.0
        self._stages = stages

    def count(self, stage: Stage) -> int:
        if self._known and time.monotonic() - self._asked_at >= self.EVERY_S:
            self._asked_at = time.monotonic()
            try:
                found = self._admin.describe_consumer_groups([s.group for s in self._stages], request_timeout=2)
                for s in self._stages:
                    self._counts[s.name] = len(found[s.group].result(timeout=3).members)
            except Exception as exc:  # a broker between lives: keep the last count
                log.info("group members not described: %s", exc)
        return self._counts[stage.name]


def export(state: dict[str, Any], lag: StageLag, statuses: dict[int, str]) -> None:
    """One stage's state into the process's Prometheus gauges."""
    stage = state["stage"]
    for partition, pl in lag.partitions.items():
        metrics.LAG_MESSAGES.labels(stage, str(partition)).set(pl.lag)
    metrics.LAG_SECONDS.labels(stage).set(state["lag_seconds"])
    metrics.LAG_SECONDS_INTERPOLATED.labels(stage).set(state["lag_seconds_interpolated"])
    metrics.STAGE_STATUS.labels(stage).set(STAGE_CODES[state["health"]])
    for partition, status in statuses.items():
        for name in (OK, WARN, STALL, STOP, REWIND):
            metrics.PARTITION_STATUS.labels(stage, str(partition), name).set(1 if status == name else 0)
    metrics.CAP_MESSAGES.labels(stage).set(state["cap"])
    metrics.PRESSURE_STATE.labels(stage).set(metrics.STATUS_CODES[state["state"]])
    metrics.DRAIN_RATE.labels(stage).set(state["drain_rate"])
    metrics.ARRIVAL_RATE.labels(stage).set(state["arrival_rate"])
    metrics.DRAIN_TIME.labels(stage).set(drain_time_s(state["lag"], state["drain_rate"], state["arrival_rate"]))
    if state["members"] >= 0:
        metrics.GROUP_MEMBERS.labels(stage).set(state["members"])
    metrics.GROUP_PARTITIONS.labels(stage).set(state["partitions"])


def main() -> None:
    """Runs the monitor until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    monitor = LagMonitor(settings)

    stop_on_signals(monitor.stopping)
    monitor.run()
