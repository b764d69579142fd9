"""A fleet of two pools on the real broker (issue 26, items 1, 4 and 6): each pool's
workers read its own contexts topic in its own group, the lag monitor publishes a
state per pool with its models, and a pool's circuit opens when its only worker is
SIGKILLed under traffic, half-opens and closes once the worker is back, while the
requests queued in the pool wait for it and are all answered (design point 4: they
wait, never re-routed, never lost).

The envelopes are produced straight to the pools' contexts topics, as the processors'
router would (it is tested on its own: tests/test_fleet_routing.py); the default
pool keeps today's names, the `spare` pool has `<prefix>contexts.spare` and
`<WORKER_GROUP>.spare`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_END, Consumer, KafkaError, Producer, TopicPartition

from ops.lag_report import lag_rows
from schemas import AVRO, content_type_header, get_codec
from streams.config import Settings
from streams.kafka import connection_config
from streams.lag import LagReader, pipeline_stages
from streams.pressure_feed import PressureListener
from tests.conftest import Pipeline
from tests.helpers import TopicReader, wait_for
from tests.hostile import envelope

FLEET = """
models:
  smol: {aliases: [gpt-4o-mini], token_budget: 512, fallbacks: [tiny]}
  tiny: {token_budget: 256}
pools:
  default: {engine: echo, models: [smol], partitions: 2}
  spare: {engine: echo, models: [smol, tiny], partitions: 2, weight: 2, workers_cap_messages: 500}
"""
SPARE = "workers.spare"
OPEN_S = 4.0  # the first cool-down (CIRCUIT_OPEN_S): the default's 10 s, shortened for the test
PROBES = 3
HEALTH_WINDOW_S = 6.0  # Burrow's window: on Tansu (no members listed) STOP is the signal
# SIGKILL to open: the session timeout (6 s) for the group to lose its member, the
# monitor's DescribeGroups (every 5 s), a sample; on Tansu the health window, a sample
OPEN_BOUND_S = 25.0
# failing replies to open: a second's outcomes (20+ replies, all errors), a sample; 3.4 s
# on Apache Kafka, 17 s seen on Tansu after the worker's restart in the module's run
ERRORS_OPEN_BOUND_S = 40.0
CLOSE_BOUND_S = 60.0  # restart (the echo model loads in seconds), cool-down, probes answered
SPARE_ENV = {"TIDEGATE_POOL": "spare"}


@pytest.fixture(scope="module")
def fleet(pipeline_factory: Callable[..., Pipeline], tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    path = Path(tmp_path_factory.mktemp("fleet")) / "fleet.yaml"
    path.write_text(FLEET)
    pipeline = pipeline_factory(
        roles=(),
        fleet_file=str(path),
        circuit_open_s=OPEN_S,
        circuit_open_max_s=2 * OPEN_S,  # the tests' openings in a row stay short
        circuit_probes=PROBES,
        health_window_s=HEALTH_WINDOW_S,
    )
    pipeline.start(("monitor", "worker"))  # the default pool's worker: POOL unset
    pipeline.start(("worker-spare",), extra_env=SPARE_ENV)
    return pipeline


class Envelopes:
    """Produces ContextEnvelopes to a pool's contexts topic, as the router would."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = Producer(connection_config(settings))
        self.sent: list[str] = []

    def send(self, topic: str, **fields: Any) -> str:
        request_id = f"r-{uuid.uuid4().hex[:12]}"
        record = envelope(self.settings, request_id, version=4, **fields)
        self.producer.produce(
            topic,
            get_codec().encode("ContextEnvelope", record),
            request_id.encode(),
            headers=[content_type_header(AVRO)],
        )
        self.producer.poll(0)
        self.sent.append(request_id)
        return request_id

    def flush(self) -> None:
        assert self.producer.flush(10) == 0


class Replies:
    """Every reply on the replies topic, by request id."""

    def __init__(self, settings: Settings) -> None:
        self.reader = TopicReader(settings, settings.topics.replies)

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {
            r["request_id"]: r for r in (get_codec().decode(m.value(), "InferenceReply")[1] for m in self.reader.poll())
        }

    def wait(self, ids: list[str], timeout_s: float, what: str) -> dict[str, dict[str, Any]]:
        """The replies once every one of `ids` has one."""
        wait_for(lambda: set(ids) <= set(self.by_id()), timeout_s, what)
        return self.by_id()


class CircuitWatch:
    """Every state the monitor publishes for `stage` from now on, in order."""

    def __init__(self, settings: Settings, stage: str) -> None:
        self.stage = stage
        self.states: list[dict[str, Any]] = []
        self._consumer = Consumer(
            {**connection_config(settings), "group.id": f"watch-{uuid.uuid4().hex}", "fetch.wait.max.ms": 50}
        )
        self._consumer.assign([TopicPartition(settings.topics.pressure, 0, OFFSET_END)])

    def poll(self) -> list[str]:
        """The circuit's states seen so far, repeats folded."""
        for m in self._consumer.consume(1000, 0.1):
            if m.error() is None:
                state = get_codec().decode(m.value(), "PressureState")[1]
                if state["stage"] == self.stage:
                    self.states.append(state)
            elif m.error().code() != KafkaError._PARTITION_EOF:
                raise AssertionError(str(m.error()))
        return folded(self.states)

    def last(self) -> dict[str, Any]:
        return self.states[-1]

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def listener(fleet: Pipeline) -> Iterator[PressureListener]:
    listener = PressureListener(fleet.settings)
    listener.start()
    yield listener
    listener.close()


def test_each_pool_has_a_state_with_its_models_and_its_workers_answer_its_topic(
    fleet: Pipeline, listener: PressureListener
) -> None:
    settings = fleet.settings
    states = wait_for(
        lambda: (
            (listener.board.state("workers"), listener.board.state(SPARE))
            if all((listener.board.state(s) or {}).get("pool") for s in ("workers", SPARE))
            else None
        ),
        15,
        "a state per pool",
    )
    default, spare = states
    smol = {"id": "smol", "aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]}
    tiny = {"id": "tiny", "aliases": [], "token_budget": 256, "fallbacks": []}
    assert (default["pool"], default["models"], default["weight"]) == ("default", [smol], 1.0)
    assert (spare["pool"], spare["models"], spare["weight"], spare["cap"]) == ("spare", [smol, tiny], 2.0, 500)
    assert default["circuit"] == spare["circuit"] == "closed"
    assert spare["partitions"] == 2

    envelopes, replies = Envelopes(settings), Replies(settings)
    fallback = {"fallback_from": "big", "fallback_reason": "full"}
    to_default = envelopes.send(settings.topics.contexts, model="smol", pool="default", **fallback)
    to_spare = envelopes.send(f"{settings.topics.contexts}.spare", model="tiny", pool="spare")
    old = envelopes.send(f"{settings.topics.contexts}.spare", model="")  # before fleets: no model named
    envelopes.flush()
    answered = replies.wait([to_default, to_spare, old], 30, "replies")
    assert answered[to_default]["status"] == answered[to_spare]["status"] == "ok"
    assert answered[to_default]["model"] == "smol"  # the public id, not the engine
    assert (answered[to_default]["fallback_from"], answered[to_default]["fallback_reason"]) == ("big", "full")
    assert answered[to_spare]["model"] == "tiny" and answered[to_spare]["fallback_from"] is None
    assert answered[old]["model"] == "echo"  # an envelope naming no model: the runner's name

    # each worker reported its outcomes under its pool
    outcomes = TopicReader(settings, settings.topics.outcomes)
    outcomes.wait(
        lambda ms: {get_codec().decode(m.value(), "WorkerOutcomes")[1]["pool"] for m in ms} >= {"default", "spare"},
        15,
        "outcomes from both pools",
    )

    # `tidegate lag`: a row per pool, its circuit among the columns
    reader = LagReader(settings, pipeline_stages(settings))
    try:
        rows = {r["stage"]: r for r in lag_rows(reader, listener)}
    finally:
        reader.close()
    assert set(rows) == {"processors", "workers", SPARE}
    assert rows[SPARE]["topic"] == f"{settings.topics.contexts}.spare"
    assert rows[SPARE]["group"] == f"{settings.worker_group}.spare"
    assert (rows[SPARE]["pool"], rows[SPARE]["models"], rows[SPARE]["circuit"]) == ("spare", ["smol", "tiny"], "closed")


def test_a_pool_whose_worker_is_killed_opens_and_closes_and_its_queue_waits(fleet: Pipeline) -> None:
    settings = fleet.settings
    topic = f"{settings.topics.contexts}.spare"
    envelopes, replies, watch = Envelopes(settings), Replies(settings), CircuitWatch(settings, SPARE)
    others = CircuitWatch(settings, "workers")
    traffic = threading.Event()
    traffic.set()
    stop = threading.Event()

    def send() -> None:  # ~20 requests a second to the pool while the router would admit them
        while not stop.is_set():
            if traffic.is_set():
                envelopes.send(topic, model="smol", pool="spare")
            time.sleep(0.05)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        wait_for(lambda: len(replies.by_id()) >= 20, 20, "traffic answered before the kill")
        os.killpg(fleet.pids["worker-spare"], signal.SIGKILL)
        killed_at = time.monotonic()
        fleet.wait_exited("worker-spare", 10)
        wait_for(lambda: watch.poll()[-1:] == ["open"], OPEN_BOUND_S, "the spare pool's circuit to open")
        opened_s = time.monotonic() - killed_at
        traffic.clear()  # open: a router sends the pool nothing new
        opened = watch.last()
        assert opened["circuit_reason"] in ("no_members", "stalled"), opened
        assert opened["circuit_until_ms"] > opened["updated_ms"]
        envelopes.flush()
        queued = [r for r in envelopes.sent if r not in replies.by_id()]
        assert queued, "requests queued in the pool when it opened"

        fleet.start(("worker-spare",), extra_env=SPARE_ENV)
        restarted_at = time.monotonic()
        wait_for(lambda: "half_open" in watch.poll(), CLOSE_BOUND_S, "the circuit to half-open")
        half_open = next(s for s in watch.states if s["circuit"] == "half_open")
        assert half_open["probes"] == PROBES
        for _ in range(PROBES):  # a router's probes
            envelopes.send(topic, model="smol", pool="spare")
        envelopes.flush()
        wait_for(lambda: watch.poll()[-1:] == ["closed"], CLOSE_BOUND_S, "the circuit to close")
        closed_s = time.monotonic() - restarted_at
    finally:
        stop.set()
        sender.join(5)
        envelopes.flush()
        watch.close()

    # every request sent is answered, those queued while the circuit was open among them
    answered = replies.wait(envelopes.sent, 30, "every request answered")
    assert all(answered[r]["status"] == "ok" for r in envelopes.sent)
    seen = folded(watch.states)
    assert seen[:1] == ["closed"] and "open" in seen and seen[-1] == "closed", seen
    assert set(others.poll()) == {"closed"}, "the other pool's circuit stays closed"
    others.close()
    print(
        f"FLEET circuit: open {opened_s:.1f}s after the kill ({opened['circuit_reason']}), "
        f"closed {closed_s:.1f}s after the restart; {len(queued)} queued while open, all answered; states {seen}"
    )


def test_a_pool_whose_model_fails_opens_on_its_error_replies_and_closes_once_it_answers(fleet: Pipeline) -> None:
    """The workers' outcomes, through Kafka: every batch of the spare pool's worker
    fails (fault point worker.model_error), its `error` replies open the circuit with
    reason `errors`; a worker that answers closes it through its probes."""
    settings = fleet.settings
    topic = f"{settings.topics.contexts}.spare"
    envelopes, replies, watch = Envelopes(settings), Replies(settings), CircuitWatch(settings, SPARE)
    fleet.stop(("worker-spare",))
    fleet.start(("worker-spare",), extra_env={**SPARE_ENV, "TIDEGATE_FAULTS": "worker.model_error@1+"})
    try:
        sent_at = time.monotonic()
        while watch.poll()[-1:] != ["open"]:  # 20 a second until it opens
            elapsed = time.monotonic() - sent_at
            assert elapsed < ERRORS_OPEN_BOUND_S, f"no open circuit after {elapsed:.0f}s: {watch.poll()}"
            envelopes.send(topic, model="smol", pool="spare")
            time.sleep(0.05)
        opened_s = time.monotonic() - sent_at
        assert watch.last()["circuit_reason"] == "errors"
        failed = replies.wait(envelopes.sent, 30, "the failing pool's replies")
        assert {failed[r]["status"] for r in envelopes.sent} == {"error"}  # answered, never lost
        assert all("injected" in (failed[r]["error"] or "") for r in envelopes.sent)

        fleet.stop(("worker-spare",))
        fleet.start(("worker-spare",), extra_env=SPARE_ENV)  # the model mended
        wait_for(lambda: watch.poll()[-1:] == ["half_open"], CLOSE_BOUND_S, "the circuit to half-open")
        probes = [envelopes.send(topic, model="smol", pool="spare") for _ in range(PROBES)]
        envelopes.flush()
        wait_for(lambda: watch.poll()[-1:] == ["closed"], CLOSE_BOUND_S, "the circuit to close")
        assert {replies.wait(probes, 10, "the probes' replies")[r]["status"] for r in probes} == {"ok"}
    finally:
        envelopes.flush()
        watch.close()
    print(f"FLEET errors: open {opened_s:.1f}s after the failing worker's first request; states {folded(watch.states)}")


def folded(states: list[dict[str, Any]]) -> list[str]:
    """The circuit's states in order, repeats folded."""
    seen: list[str] = []
    for state in states:
        if not seen or seen[-1] != state["circuit"]:
            seen.append(state["circuit"])
    return seen
