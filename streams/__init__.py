"""Kafka and the shared runtime: settings, topics and client configuration, delivery,
outgoing records, lag, pressure, and the `Client` services use."""

from streams.client import Client
from streams.config import Settings
from streams.exceptions import QueueFull, ReplyTimeout, RequestTooLarge, SendTimeout, TidegateError
from streams.reply import Chunk, Reply, StageTimings
from streams.request_options import InvalidRequest, RequestOptions

__all__ = [
    "Chunk",
    "Client",
    "InvalidRequest",
    "QueueFull",
    "Reply",
    "ReplyTimeout",
    "RequestOptions",
    "RequestTooLarge",
    "SendTimeout",
    "Settings",
    "StageTimings",
    "TidegateError",
]
