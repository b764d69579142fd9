"""Lowers faust's hard-coded 1.5 s fetch wait, which sets the latency of every hop.

faust-streaming 0.15.3 builds its aiokafka consumer with fetch_max_wait_ms=1500;
on the embedded broker that costs about 0.4 s per hop (DESIGN.md). aiokafka reads
the value when the consumer starts, so setting it right after creation is enough.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

_original = AIOKafkaConsumerThread._create_worker_consumer
_fetch_wait_ms = 1500


def set_fetch_wait_ms(value: int) -> None:
    global _fetch_wait_ms
    _fetch_wait_ms = value
    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]


def _create_worker_consumer(self: AIOKafkaConsumerThread, transport: Any) -> Any:
    consumer = _original(self, transport)
    consumer._fetch_max_wait_ms = _fetch_wait_ms
    return consumer
