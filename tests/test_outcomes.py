"""A worker's outcome reports (inference/outcomes.py) and the pool it serves
(inference/pools.py), and the monitor's tail of them (ops/outcomes_tail.py), without
a broker: the producer is a fake that records, refuses or fails deliveries as a test
needs; the tail's consumer a fake that hands over the records a test writes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError

from inference.outcomes import OutcomeReporter
from inference.pools import worker_pool
from ops.breaker import CLOSED, HALF_OPEN, OPEN, Signals
from ops.outcomes_tail import OutcomesTail
from ops.pools import PoolStates
from schemas import get_codec
from streams.config import Settings
from streams.fleet import FleetError, parse_fleet

ROOT = Path(__file__).resolve().parent.parent
FLEET = """
models:
  smol: {aliases: [gpt-4o-mini], token_budget: 512}
pools:
  fast: {engine: "sim:1", models: [smol], max_batch: 4}
  spare: {engine: echo, models: [smol]}
"""


class FakeProducer:
    """Records what is produced; `refuse` makes produce() raise, `fail` fails the delivery."""

    def __init__(self) -> None:
        self.produced: list[dict[str, Any]] = []
        self.pending: list[tuple[Callable[..., None], KafkaError | None]] = []
        self.refuse = False
        self.fail = False

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        if self.refuse:
            raise BufferError("Local: Queue full")
        self.produced.append({"topic": topic, "key": key, **get_codec().decode(value, "WorkerOutcomes")[1]})
        self.pending.append((on_delivery, KafkaError(KafkaError._MSG_TIMED_OUT) if self.fail else None))

    def poll(self, _timeout: float) -> int:
        pending, self.pending = self.pending, []
        for callback, err in pending:
            callback(err, None)
        return len(pending)

    def flush(self, _timeout: float) -> int:
        return 0 * self.poll(0)


def reporter(producer: FakeProducer) -> OutcomeReporter:
    return OutcomeReporter(Settings(stats_interval_s=1.0), "fast", "host:1", producer)  # type: ignore[arg-type]


def test_counts_are_published_once_an_interval_and_only_when_there_are_any() -> None:
    producer = FakeProducer()
    outcomes = reporter(producer)
    start = outcomes._since
    outcomes.maybe_publish(start + 5)
    assert producer.produced == []  # nothing answered: nothing published
    for status in ("ok", "ok", "error", "expired", "invalid", "queue_full"):
        outcomes.count(status)
    outcomes.maybe_publish(start + 5.5)  # a second since the last (empty) interval
    outcomes.maybe_publish(start + 5.6)
    assert len(producer.produced) == 1
    record = producer.produced[0]
    assert record["topic"] == "tidegate.outcomes" and record["key"] == b"fast"
    assert (record["pool"], record["member"]) == ("fast", "host:1")
    assert (record["ok"], record["errors"], record["expired"]) == (2, 1, 1)  # `invalid` is the caller's doing
    outcomes.count("ok")
    outcomes.maybe_publish(start + 6.0)  # under a second since the last record
    assert len(producer.produced) == 1
    outcomes.maybe_publish(start + 6.6)
    assert [r["ok"] for r in producer.produced] == [2, 1]


def test_a_failed_delivery_keeps_its_counts_for_the_next_interval() -> None:
    producer = FakeProducer()
    outcomes = reporter(producer)
    start = outcomes._since
    producer.fail = True
    outcomes.count("error")
    outcomes.maybe_publish(start + 1)
    outcomes.maybe_publish(start + 1.1)  # its delivery report: failed
    assert outcomes.counts.errors == 1
    producer.fail = False
    outcomes.count("ok")
    outcomes.maybe_publish(start + 2.2)
    assert (producer.produced[-1]["ok"], producer.produced[-1]["errors"]) == (1, 1)


def test_a_record_that_cannot_be_queued_neither_raises_nor_loses_its_counts() -> None:
    producer = FakeProducer()
    outcomes = reporter(producer)
    start = outcomes._since
    producer.refuse = True
    outcomes.count("ok")
    outcomes.maybe_publish(start + 1)  # BufferError inside: not raised
    assert outcomes.counts.ok == 1
    producer.refuse = False
    outcomes.close()  # the last counts go out on the way out, interval over or not
    assert producer.produced[-1]["ok"] == 1


def test_the_worker_takes_its_pools_topic_group_engine_and_batch(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    settings, pool = worker_pool(Settings(fleet_file=str(fleet), pool="fast", worker_group="w", max_batch=16))
    assert (pool.contexts_topic, settings.worker_group) == ("tidegate.contexts.fast", "w.fast")
    assert (settings.model, settings.max_batch) == ("sim:1", 4)
    settings, pool = worker_pool(Settings(fleet_file=str(fleet), pool="spare", max_batch=16))
    assert (settings.model, settings.max_batch) == ("echo", 16)  # no max_batch in the file: MAX_BATCH
    with pytest.raises(FleetError, match=r"TIDEGATE_POOL='nope' is not a pool of the fleet \(pools: fast, spare\)"):
        worker_pool(Settings(fleet_file=str(fleet), pool="nope"))


def test_without_a_fleet_file_the_worker_is_todays() -> None:
    before = Settings(model="echo", max_batch=8)
    settings, pool = worker_pool(before)
    assert settings == before
    assert (pool.name, pool.contexts_topic, pool.group) == ("default", "tidegate.contexts", "tidegate-workers")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TIDEGATE_POOL": "nope"}, "worker: TIDEGATE_POOL='nope' is not a pool of the fleet (pools: fast, spare)"),
        ({"TIDEGATE_POOL": "fast", "TIDEGATE_FLEET_FILE": "{bad}"}, "pools.fast.engine: expected a runner name"),
    ],
)
def test_a_worker_of_no_pool_or_a_bad_fleet_file_exits_with_one_line(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    fleet, bad = tmp_path / "fleet.yaml", tmp_path / "bad.yaml"
    fleet.write_text(FLEET)
    bad.write_text(FLEET.replace('engine: "sim:1", ', ""))
    env = {"TIDEGATE_FLEET_FILE": str(fleet), **{k: v.replace("{bad}", str(bad)) for k, v in env.items()}}
    done = subprocess.run(
        [sys.executable, "-m", "inference"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


class FakeMessage:
    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class FakeConsumer:
    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def consume(self, _n: int, _timeout: float) -> list[FakeMessage]:
        values, self.values = self.values, []
        return [FakeMessage(v, i) for i, v in enumerate(values)]

    def close(self) -> None:
        pass


def outcomes(**counts: int) -> bytes:
    record = {"pool": "fast", "member": "x:1", "ok": 0, "errors": 0, "expired": 0, "interval_ms": 1000}
    return get_codec().encode("WorkerOutcomes", {**record, **counts, "updated_ms": 1})


def test_a_crafted_outcomes_record_is_skipped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Any client may write <prefix>outcomes: a record that does not decode, or whose
    counts are negative (no worker sends one), is skipped with a log line. Taken, a
    count of -10**18 ok replies in a half-open circuit's tally kept it from ever
    closing (5 ok replies close it), and in a closed one's window hid its errors."""
    settings = Settings(fleet_file="fleet.yaml")
    pools = PoolStates(settings, parse_fleet(yaml.safe_load(FLEET), settings))
    assert isinstance(pools.tail, OutcomesTail)
    pools.tail.close()
    pools.tail._consumer = FakeConsumer(  # type: ignore[assignment]
        [outcomes(ok=-(10**18)), b"\xc3\x01garbage", outcomes(errors=-5, ok=3), outcomes(ok=5)]
    )
    pools.tail._assigned = True
    breaker = pools.breakers["fast"]
    breaker.resume(OPEN, 0, "errors")  # its cool-down over: half-open at the next sample
    assert breaker.update(Signals(0, 1, False)).state == HALF_OPEN
    with caplog.at_level("WARNING", "ops.outcomes_tail"):
        pools.poll()
    assert "negative" in caplog.text and "skipped" in caplog.text
    assert breaker.update(Signals(0, 1, False)).state == CLOSED  # the 5 ok replies of the good record


def test_without_a_fleet_file_a_worker_publishes_no_outcomes() -> None:
    """No breaker reads them without a fleet (ops/pools.py); before, every worker made a
    producer for the outcomes topic and, on a deployment whose topics predate it, was
    warned every interval about a topic nothing needed."""
    from inference.outcomes import OutcomeReporter
    from streams.config import Settings

    reporter = OutcomeReporter(Settings(bootstrap="127.0.0.1:1"), "default", "m")
    assert not reporter.enabled and reporter.producer is None
    reporter.count("error")
    reporter.maybe_publish(now=10**9)
    reporter.close()
