"""Avro schemas (.avsc) of tidegate's topics and the codec that reads and writes them."""

from schemas.codec import (
    AVRO,
    JSON,
    Codec,
    SerializationError,
    content_type,
    content_type_header,
    get_codec,
)

__all__ = [
    "AVRO",
    "JSON",
    "Codec",
    "SerializationError",
    "content_type",
    "content_type_header",
    "get_codec",
]
