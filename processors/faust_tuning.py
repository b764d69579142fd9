"""Two faust-streaming 0.15.3 defaults that cost the processors latency or CPU.

- Its aiokafka consumer is built with fetch_max_wait_ms=1500; on Tansu
  that costs about 0.4 s per hop (docs/design.md). aiokafka reads the value when
  the consumer starts, so setting it right after creation is enough.
- Its worker spins a terminal spinner on every log record, and for that sets the
  root logger to DEBUG for the life of the process (`faust/worker.py`
  `_setup_spinner_handler`): every debug record of aiokafka, mode and faust is then
  built and dropped by the handlers. `QuietWorker` keeps the configured level.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
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


class QuietWorker(faust.Worker):
    """faust's worker without the terminal spinner (the root logger keeps its level)."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
