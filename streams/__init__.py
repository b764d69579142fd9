"""Kafka plumbing: config, topics, the client, replies, lag and pressure, the dev stack, the CLI."""

from typing import TYPE_CHECKING, Any

from streams.exceptions import QueueFull, ReplyTimeout, TidegateError

if TYPE_CHECKING:
    from streams.client import Client
    from streams.config import Settings

__all__ = ["Client", "QueueFull", "ReplyTimeout", "Settings", "TidegateError"]


def __getattr__(name: str) -> Any:
    # Imported lazily: the schemas package imports streams.exceptions, and the
    # client imports schemas.
    if name == "Client":
        from streams.client import Client

        return Client
    if name == "Settings":
        from streams.config import Settings

        return Settings
    raise AttributeError(name)
