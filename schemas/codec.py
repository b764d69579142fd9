"""Reads and writes tidegate's messages: Avro single-object encoding, and JSON requests.

Single-object encoding is the 2-byte marker C3 01, the schema's 8-byte CRC-64-AVRO
fingerprint (little-endian), then the Avro binary body. A reader can therefore
always tell which schema wrote a message and refuse one it does not know.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import orjson
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import validate

from streams.exceptions import TidegateError

MARKER = b"\xc3\x01"
HEADER_LEN = 10
CONTENT_TYPE = "content-type"
AVRO = "avro"
JSON = "json"
AVRO_CONTENT_TYPE = "application/vnd.tidegate.avro"
JSON_CONTENT_TYPE = "application/json"

SCHEMA_FILES = {
    "InferenceRequest": "inference_request.avsc",
    "ContextEnvelope": "context_envelope.avsc",
    "InferenceReply": "inference_reply.avsc",
    "PressureState": "pressure_state.avsc",
}

Record = dict[str, Any]
Headers = Sequence[tuple[str, bytes | str | None]] | None


class SerializationError(TidegateError, ValueError):
    """A message could not be encoded or decoded; the message says which schema and why."""


class _Schema:
    """One parsed schema with its fingerprint and the defaults a JSON reader fills in."""

    def __init__(self, name: str, raw: dict[str, Any]) -> None:
        self.name = name
        self.parsed = parse_schema(raw, named_schemas={})
        self.fingerprint = bytes.fromhex(fingerprint(to_parsing_canonical_form(self.parsed), "CRC-64-AVRO"))
        self.prefix = MARKER + self.fingerprint
        self.defaults = {f["name"]: f["default"] for f in raw["fields"] if "default" in f}


def _load_schemas() -> dict[str, _Schema]:
    folder = resources.files("schemas")
    return {name: _Schema(name, json.loads(folder.joinpath(file).read_text())) for name, file in SCHEMA_FILES.items()}


class Codec:
    """Parses every `.avsc` once; encodes records and decodes bytes by fingerprint."""

    def __init__(self) -> None:
        self.schemas = _load_schemas()
        self._by_fingerprint = {s.fingerprint: s for s in self.schemas.values()}

    def fingerprint(self, name: str) -> bytes:
        return self.schemas[name].fingerprint

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        schema = self.schemas[name]
        out = io.BytesIO()
        out.write(schema.prefix)
        try:
            schemaless_writer(out, schema.parsed, dict(record))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerializationError(f"cannot encode {name}: {exc}") from exc
        return out.getvalue()

    def decode(self, data: bytes | None, expected: str | None = None) -> tuple[str, Record]:
        """Decodes single-object Avro; `expected` refuses any other schema."""
        if not data or len(data) < HEADER_LEN or data[:2] != MARKER:
            raise SerializationError("not Avro single-object encoding (no C3 01 marker)")
        schema = self._by_fingerprint.get(data[2:HEADER_LEN])
        if schema is None:
            raise SerializationError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        if expected is not None and schema.name != expected:
            raise SerializationError(f"expected {expected}, got {schema.name}")
        try:
            record = schemaless_reader(io.BytesIO(data[HEADER_LEN:]), schema.parsed, None)
        except Exception as exc:  # fastavro raises many types on truncated input
            raise SerializationError(f"corrupt {schema.name} body: {exc}") from exc
        return schema.name, record  # type: ignore[return-value]

    def encode_json(self, name: str, record: Mapping[str, Any]) -> bytes:
        return orjson.dumps(dict(record))

    def decode_json(self, data: bytes | None, name: str) -> Record:
        """Parses JSON, fills schema defaults and validates against the Avro schema."""
        schema = self.schemas[name]
        try:
            obj = orjson.loads(data or b"")
        except orjson.JSONDecodeError as exc:
            raise SerializationError(f"invalid JSON for {name}: {exc}") from exc
        if not isinstance(obj, dict):
            raise SerializationError(f"JSON {name} must be an object")
        record = {**schema.defaults, **obj}
        unknown = set(record) - {f["name"] for f in schema.parsed["fields"]}
        if unknown:
            raise SerializationError(f"JSON {name} has unknown fields {sorted(unknown)}")
        try:
            validate(record, schema.parsed, raise_errors=True)
        except Exception as exc:
            raise SerializationError(f"JSON {name} does not match the schema: {exc}") from exc
        return record

    def decode_message(self, data: bytes | None, headers: Headers, expected: str) -> tuple[Record, str]:
        """Decodes a message by its content-type header; returns the record and its encoding."""
        if content_type(headers) == JSON_CONTENT_TYPE:
            return self.decode_json(data, expected), JSON
        return self.decode(data, expected)[1], AVRO

    def encode_as(self, name: str, record: Mapping[str, Any], encoding: str) -> bytes:
        if encoding == JSON:
            return self.encode_json(name, record)
        return self.encode(name, record)


def content_type(headers: Headers) -> str | None:
    for key, value in headers or ():
        if key.lower() == CONTENT_TYPE:
            return value.decode() if isinstance(value, bytes) else value
    return None


def content_type_header(encoding: str) -> tuple[str, bytes]:
    ctype = JSON_CONTENT_TYPE if encoding == JSON else AVRO_CONTENT_TYPE
    return (CONTENT_TYPE, ctype.encode())


_codec: Codec | None = None


def get_codec() -> Codec:
    """The process-wide codec: schemas are parsed once."""
    global _codec
    if _codec is None:
        _codec = Codec()
    return _codec
