"""The lag monitor: measures each stage's lag and publishes a PressureState per stage.

Runs as its own process (`tidegate monitor`, started by `dev up`), one per
deployment; a second one only publishes the same states twice. It publishes every
`pressure_interval_ms` while anything moves (a log end or a commit), and at least
once a second otherwise: on Tansu every publish is a record batch on
the pressure topic's one partition (about 5 a second under load, 1 when idle).
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import KafkaException, Producer

from schemas import AVRO, content_type_header, get_codec
from streams.config import Settings
from streams.exceptions import TidegateError
from streams.kafka import producer_config
from streams.lag import LagReader, pipeline_stages
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
        self.producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self.codec = get_codec()
        self.stopping = threading.Event()

    def sample(self) -> tuple[list[dict], tuple[int, ...]]:
        """One measurement of every stage: PressureState records, and a signature
        (log ends and commits) that changes whenever anything moved."""
        self.reader.poll(0)
        states, signature = [], []
        for stage in self.stages:
            lag = self.reader.lag(stage)
            states.append(self.gauges[stage.name].update(lag.lag, lag.committed))
            signature += [lag.log_end, lag.committed]
        return states, tuple(signature)

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
                self.stopping.wait(min(RETRY_MAX_S, interval * 2**min(failures, 5)))
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
        self.producer.flush(5)


def main() -> None:
    """Runs the monitor until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    monitor = LagMonitor(Settings())

    stop_on_signals(monitor.stopping)
    monitor.run()


