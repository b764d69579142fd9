"""Avro schemas (.avsc) of tidegate's topics and the codec that reads and writes them."""

from schemas.codec import (
    AVRO,
    JSON,
    Codec,
    content_type,
    content_type_header,
    get_codec,
)
from schemas.exceptions import SerializationError, TidegateError

__all__ = [
    "AVRO",
    "JSON",
    "Codec",
    "SerializationError",
    "TidegateError",
    "content_type",
    "content_type_header",
    "get_codec",
]
