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

The workers are a stage per pool of the fleet (FLEET_FILE; without it the one
`workers` stage), each with its own cap, and its state says which models the pool
serves and its circuit: the monitor runs each pool's circuit breaker (ops/pools.py,
ops/breaker.py) on the workers' outcomes and the group's health, so that every
router reads one breaker through Kafka.

It never exits on a transient fault (a broker restarting, a coordinator loading, a
tail's fetch error): it measures again with backoff, and the states go stale for
their readers meanwhile, never wrong. A monitor that starts (or restarts: the
supervisor restarts one that died) resumes each stage's drain rate from the last
state on the compacted pressure topic, when it is recent: starting from nothing, a
seconds-cap fell to its floor and a burst of `queue_full` followed every restart.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ops.breaker import CIRCUIT_CODES, CLOSED
from ops.burrow import OK, REWIND, STAGE_CODES, STALL, STOP, WARN, GroupHealth
from ops.commit_log import CommitLog
from ops.pools import PoolStates, pool_caps
from ops.scaling import drain_time_s
from schemas import AVRO, SerializationError, content_type_header, get_codec
from streams import metrics
from streams.config import Settings
from streams.exceptions import TidegateError
from streams.fleet import FleetError, load_fleet
from streams.kafka import admin_client, connection_config, producer_config
from streams.lag import LagReader, Stage, StageLag, pipeline_stages
from streams.lifecycle import announce_ready, stop_on_signals
from streams.outgoing import now_ms
from streams.pressure import PressureGauge, stage_caps
from streams.pressure_feed import REPLAY

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
RETRY_MAX_S = 5.0
# a published state older than this says nothing about the stage now (it was rescaled,
# or the deployment was down): a monitor starting after it measures afresh
RESUME_MAX_AGE_S = 300.0
LAST_STATES_WAIT_S = 3.0


class LagMonitor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        fleet = load_fleet(settings)
        self.stages = pipeline_stages(settings, fleet)
        self.reader = LagReader(settings, self.stages)
        caps = {**stage_caps(settings), **pool_caps(settings, fleet)}
        self.gauges = {s.name: PressureGauge(s.name, caps[s.name], settings.warn_ratio) for s in self.stages}
        self.pools = PoolStates(settings, fleet)
        for name, state in last_states(settings).items():
            if name in self.gauges and resume_gauge(self.gauges[name], state, now_ms()):
                log.info("stage=%s drain rate resumed at %.1f/s, cap %d", name, state["drain_rate"], state["cap"])
            if now_ms() - state["updated_ms"] <= RESUME_MAX_AGE_S * 1000:
                self.pools.resume(name, state)
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
        self.pools.poll()
        now = time.time()
        states, signature = [], []
        for stage in self.stages:
            lag = self.reader.lag(stage)
            # progress as per-partition steps: a tenant's topic deleted (or re-added) moves no rate
            state = self.gauges[stage.name].update(lag.lag, lag.done)
            states.append(self._operators_view(stage, lag, state, now))
            # a circuit that changed is published at once, not at the next heartbeat
            signature += [lag.log_end, lag.committed, CIRCUIT_CODES.get(state.get("circuit", CLOSED), 0)]
        return states, tuple(signature)

    def _operators_view(self, stage: Stage, lag: StageLag, state: dict[str, Any], now: float) -> dict[str, Any]:
        """Adds lag seconds, health, arrival rate and members to a stage's state, and
        sets its Prometheus gauges."""
        commit_times = {
            stage.label(topic, p): ms / 1000
            for (group, topic, p), ms in self.commit_log.last_commit_ms.items()
            if group == stage.group and stage.reads(topic)
        }
        health = self.health[stage.name]
        health.add(
            now,
            {p: pl.committed for p, pl in lag.partitions.items()},
            {p: pl.lag for p, pl in lag.partitions.items()},
            commit_times if self.commit_log.available else None,
        )
        statuses = health.statuses(now)
        arrival = self.arrivals[stage.name].update(lag.arrived, now)
        members = self.members.count(stage, lag.lag)
        state.update(
            lag_seconds=round(lag.lag_seconds, 3),
            lag_seconds_interpolated=round(lag.lag_seconds_interpolated, 3),
            health=health.stage_status(now),
            partition_health=dict(statuses),
            arrival_rate=round(arrival, 3),
            members=members,
            partitions=self.reader.partition_count(stage),
        )
        self.pools.judge(stage.name, lag, statuses, state)
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
                if signature != last_signature or started - last_sent >= HEARTBEAT_S:
                    self.publish(states)
                    last_signature, last_sent = signature, started
                    if not announced:
                        announced = True
                        announce_ready()
                # tail the topics until the next sample: keeps the log ends current
                self.reader.poll(max(0.0, interval - (time.monotonic() - started)))
            except (KafkaException, TidegateError, BufferError) as exc:
                # a broker restarting, its group coordinator still loading, a fetch or a
                # produce failing: wait and measure again; the states go stale for
                # readers meanwhile, never wrong
                failures += 1
                log.warning("attempt=%d lag not measured, retrying: %s", failures, exc)
                self.stopping.wait(min(RETRY_MAX_S, interval * 2 ** min(failures, 5)))
                continue
            if failures:
                log.warning("lag measured again after %d failed attempts", failures)
                failures = 0
        self.reader.close()
        self.commit_log.close()
        self.pools.close()
        self.producer.flush(5)


def last_states(settings: Settings, timeout_s: float = LAST_STATES_WAIT_S) -> dict[str, dict[str, Any]]:
    """The latest PressureState per stage on the pressure topic, read up to its end as
    it is now (the last REPLAY records per partition: the monitor republishes every
    stage at least once a second); {} when there is none or the topic is unreadable."""
    consumer = Consumer(
        {
            **connection_config(settings),
            "group.id": f"tidegate-monitor-resume-{uuid.uuid4().hex}",  # never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
        }
    )
    codec, found = get_codec(), {}
    try:
        topic = settings.topics.pressure
        meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
        ends, assignment = {}, []
        for p in sorted(meta.partitions) if meta is not None and meta.error is None else []:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, max(low, high - REPLAY)))
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.2):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        ends.pop(message.partition(), None)
                    continue
                if message.offset() + 1 >= ends.get(message.partition(), 0):
                    ends.pop(message.partition(), None)
                try:
                    state = codec.decode(message.value(), "PressureState")[1]
                except SerializationError:
                    continue
                if state["updated_ms"] >= found.get(state["stage"], {}).get("updated_ms", -1):
                    found[state["stage"]] = state
    except KafkaException as exc:  # no broker yet: the monitor starts from nothing
        log.info("last pressure states not read: %s", exc)
    finally:
        consumer.close()
    return found


def resume_gauge(gauge: PressureGauge, state: dict[str, Any], at_ms: int) -> bool:
    """Starts `gauge` from a state published by an earlier monitor, unless it is older
    than RESUME_MAX_AGE_S or had no drain rate: the rate, as ended spells of the busy
    time it was measured over (so the next spells replace them as they end), and the
    state, for its hysteresis. The busy time is read back from the published cap: a
    seconds-cap grows with it (StageCap.resolve). Sets the gauge's own fields
    (streams/pressure.py has no resume of its own); True when it resumed."""
    rate = float(state.get("drain_rate", 0.0))
    if rate <= 0 or at_ms - state["updated_ms"] > RESUME_MAX_AGE_S * 1000:
        return False
    confidence = 1.0
    if gauge.cap.messages is None:
        confidence = min(1.0, state["cap"] / (gauge.cap.seconds * rate))
    busy = confidence * gauge.window_s
    ended = min(gauge._spells.maxlen or 1, math.floor(busy / gauge.short_s + 1e-9))
    gauge._spells.clear()
    gauge._spells.extend([(gauge.short_s, rate * gauge.short_s)] * ended)
    rest = max(0.0, busy - ended * gauge.short_s)
    gauge._spell = (rest, int(rate * rest))
    gauge.busy_s = busy
    gauge.drain_rate = rate
    gauge.state = state["state"]
    return True


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
    """Members of each stage's group (DescribeGroups), asked at most every few seconds,
    and again within a second while a group with work waiting reads empty (the pools'
    circuits open on an empty group: a count from before its first member joined must
    not stand for seconds); -1 where the broker does not say (Tansu lists no members)."""

    EVERY_S = 5.0
    EMPTY_EVERY_S = 1.0

    def __init__(self, settings: Settings, stages: list[Stage]) -> None:
        self._known = settings.broker == "kafka"
        self._admin = admin_client(settings)
        self._counts: dict[str, int] = {s.name: -1 for s in stages}
        self._asked_at = 0.0
        self._stages = stages

    def count(self, stage: Stage, lag: int = 0) -> int:
        since = time.monotonic() - self._asked_at
        doubtful = lag > 0 and self._counts[stage.name] == 0 and since >= self.EMPTY_EVERY_S
        if self._known and (since >= self.EVERY_S or doubtful):
            self._asked_at = time.monotonic()
            try:
                found = self._admin.describe_consumer_groups([s.group for s in self._stages], request_timeout=2)
                for s in self._stages:
                    self._counts[s.name] = len(found[s.group].result(timeout=3).members)
            except Exception as exc:  # a broker between lives: keep the last count
                log.info("group members not described: %s", exc)
        return self._counts[stage.name]


_EXPORTED: dict[str, set[str]] = {}  # per stage: the partition labels with gauges


def export(state: dict[str, Any], lag: StageLag, statuses: dict[str, str]) -> None:
    """One stage's state into the process's Prometheus gauges; the series of a
    partition the stage no longer reads (a tenant's topic deleted) are removed."""
    stage = state["stage"]
    for gone in _EXPORTED.get(stage, set()) - set(lag.partitions):
        with contextlib.suppress(KeyError):  # a series never set
            metrics.LAG_MESSAGES.remove(stage, gone)
            for name in (OK, WARN, STALL, STOP, REWIND):
                metrics.PARTITION_STATUS.remove(stage, gone, name)
    _EXPORTED[stage] = set(lag.partitions)
    for partition, pl in lag.partitions.items():
        metrics.LAG_MESSAGES.labels(stage, partition).set(pl.lag)
    metrics.LAG_SECONDS.labels(stage).set(state["lag_seconds"])
    metrics.LAG_SECONDS_INTERPOLATED.labels(stage).set(state["lag_seconds_interpolated"])
    metrics.STAGE_STATUS.labels(stage).set(STAGE_CODES[state["health"]])
    for partition, status in statuses.items():
        for name in (OK, WARN, STALL, STOP, REWIND):
            metrics.PARTITION_STATUS.labels(stage, partition, name).set(1 if status == name else 0)
    metrics.CAP_MESSAGES.labels(stage).set(state["cap"])
    metrics.PRESSURE_STATE.labels(stage).set(metrics.STATUS_CODES[state["state"]])
    metrics.DRAIN_RATE.labels(stage).set(state["drain_rate"])
    metrics.ARRIVAL_RATE.labels(stage).set(state["arrival_rate"])
    metrics.DRAIN_TIME.labels(stage).set(drain_time_s(state["lag"], state["drain_rate"], state["arrival_rate"]))
    if state["members"] >= 0:
        metrics.GROUP_MEMBERS.labels(stage).set(state["members"])
    metrics.GROUP_PARTITIONS.labels(stage).set(state["partitions"])


def start(settings: Settings, stopping: threading.Event) -> LagMonitor | None:
    """The monitor, once the broker answers and the stages' topics exist: a monitor
    started before them (a broker restarting, topics created after the stages) waits
    with backoff, one line per attempt, instead of exiting; None if stopped first."""
    attempt = 0
    while not stopping.is_set():
        try:
            monitor = LagMonitor(settings)
        except FleetError:  # the operator's to fix: no retry mends it
            raise
        except (KafkaException, TidegateError) as exc:
            attempt += 1
            log.warning("attempt=%d lag monitor not started, retrying: %s", attempt, exc)
            stopping.wait(min(RETRY_MAX_S, 0.2 * 2**attempt))
            continue
        monitor.stopping = stopping
        return monitor
    return None


def main() -> None:
    """Runs the monitor until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    try:  # checked before anything starts: one line per mistake, no traceback
        load_fleet(settings)
    except FleetError as exc:
        for line in str(exc).splitlines():
            print(f"monitor: {line}", file=sys.stderr)
        sys.exit(2)
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    stopping = threading.Event()
    stop_on_signals(stopping)
    monitor = start(settings, stopping)
    if monitor is not None:
        monitor.run()
