"""A client's own reply topic, deleted again when the start that created it failed.

A client that started keeps its reply topic when it closes: a reply still on its
way to a deleted topic held the worker producing it for minutes (streams/client.py).
A start that failed sent no request, so no reply can be on its way there, and
nothing but the start knows the topic's name: left in place, one topic stayed per
failed start, and the gateway tries a failed start again on a later request (one
topic per try during a broker's bad minute). Deleting is best effort: a broker that
does not answer keeps the topic, emptied by its retention, and a warning says so.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException

from streams.config import Settings
from streams.kafka import admin_client

log = logging.getLogger(__name__)
DELETE_TIMEOUT_S = 5.0  # short: a failed start is being answered, under the gateway's lock


def delete_reply_topic(settings: Settings, name: str, timeout_s: float = DELETE_TIMEOUT_S) -> bool:
    """Deletes `name`; True when it is gone (or never was created)."""
    admin = admin_client(settings)
    try:
        for future in admin.delete_topics([name], operation_timeout=timeout_s, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)
    except Exception as exc:  # a KafkaException, or a future that timed out
        error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
        if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return True
        log.warning("reply topic %s of a failed start not deleted: %s", name, exc)
        return False
    return True
