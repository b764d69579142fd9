"""Reads and writes tidegate's messages: Avro single-object encoding, and JSON requests.

Single-object encoding is the 2-byte marker C3 01, the schema's 8-byte CRC-64-AVRO
fingerprint (little-endian), then the Avro binary body. A reader can therefore
always tell which schema wrote a message and refuse one it does not know.

The items of an array field can be encoded once, stored, and spliced into many
messages later (`encode_item`, `encode_with_items`): a ContextEnvelope's turns are
kept in Redis in their Avro form, so a processor neither parses nor re-encodes
history it forwards. An Avro record is its fields' encodings back to back, so the
fields around the array are written by fastavro and the stored items go between.

`encode_readable` writes a record that uses nothing its schema's current version
added (those fields all hold their defaults) as the previous version: the stages and
callers a message goes between are upgraded on their own schedules, and a reader
not yet upgraded then reads every such record. A request naming no model and a reply
no fallback served are what a client and processors from before fleets wrote: each
side reads the other's whichever is upgraded first (issue 26's InferenceRequest v3
and InferenceReply v2 made each side need the other upgraded first).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from importlib import resources
from typing import Any

import orjson
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import validate

from schemas.exceptions import SerializationError

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
    "InferenceChunk": "inference_chunk.avsc",
    "WorkerOutcomes": "worker_outcomes.avsc",
    "PoolPause": "pool_pause.avsc",
}

# Schemas this version no longer writes but still reads (resolved to the current
# one): a stage upgraded first keeps reading what the others still send.
PREVIOUS_SCHEMA_FILES = {
    "InferenceRequest": ["previous/inference_request.v1.avsc", "previous/inference_request.v2.avsc"],
    "ContextEnvelope": [
        "previous/context_envelope.v1.avsc",
        "previous/context_envelope.v2.avsc",
        "previous/context_envelope.v3.avsc",
    ],
    "InferenceReply": ["previous/inference_reply.v1.avsc"],
    "PressureState": ["previous/pressure_state.v1.avsc", "previous/pressure_state.v2.avsc"],
    "InferenceChunk": ["previous/inference_chunk.v1.avsc"],
}

Record = dict[str, Any]
Headers = Sequence[tuple[str, bytes | str | None]] | None


class _Schema:
    """One parsed schema with its fingerprint and the defaults a JSON reader fills in."""

    def __init__(self, name: str, raw: dict[str, Any]) -> None:
        self.name = name
        self.parsed = parse_schema(raw, named_schemas={})
        self.fingerprint = bytes.fromhex(fingerprint(to_parsing_canonical_form(self.parsed), "CRC-64-AVRO"))
        self.prefix = MARKER + self.fingerprint
        self.defaults = {f["name"]: f["default"] for f in raw["fields"] if "default" in f}
        self.raw = raw

    @cached_property
    def _array_fields(self) -> dict[str, _ArrayField]:
        fields = self.raw["fields"]
        return {
            f["name"]: _ArrayField(self.name, fields, i)
            for i, f in enumerate(fields)
            if isinstance(f["type"], dict) and f["type"]["type"] == "array"
        }

    def array_field(self, field: str) -> _ArrayField:
        try:
            return self._array_fields[field]
        except KeyError:
            raise SerializationError(f"{self.name} has no array field {field!r}") from None


class _ArrayField:
    """An array field's item schema, and the record split around the field."""

    def __init__(self, name: str, fields: list[dict[str, Any]], index: int) -> None:
        items = fields[index]["type"]["items"]
        self.item = parse_schema(items, named_schemas={})
        self.array = parse_schema({"type": "array", "items": items}, named_schemas={})
        self.before = parse_schema(
            {"type": "record", "name": f"{name}Before", "fields": fields[:index]}, named_schemas={}
        )
        self.after = parse_schema(
            {"type": "record", "name": f"{name}After", "fields": fields[index + 1 :]}, named_schemas={}
        )


def _long(n: int) -> bytes:
    """Avro's zig-zag varint (an array block's item count)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _load_schemas() -> dict[str, _Schema]:
    folder = resources.files("schemas")
    return {name: _Schema(name, json.loads(folder.joinpath(file).read_text())) for name, file in SCHEMA_FILES.items()}


def _load_previous() -> list[_Schema]:
    folder = resources.files("schemas")
    return [
        _Schema(name, json.loads(folder.joinpath(file).read_text()))
        for name, files in PREVIOUS_SCHEMA_FILES.items()
        for file in files
    ]


def _older_writers(
    current: dict[str, _Schema], previous: list[_Schema]
) -> dict[str, list[tuple[_Schema, dict[str, Any]]]]:
    """Per schema, its previous versions a record can be written as without loss, newest
    first, each with the defaults of the fields added since: a version each of whose
    fields the current one has, of the same type, and whose missing fields have
    defaults (a reader of the current version fills them in)."""
    older: dict[str, list[tuple[_Schema, dict[str, Any]]]] = {}
    for old in reversed(previous):  # PREVIOUS_SCHEMA_FILES lists each schema's oldest first
        fields = {f["name"]: f for f in current[old.name].raw["fields"]}
        kept = {f["name"] for f in old.raw["fields"]}
        if any(f["name"] not in fields or fields[f["name"]]["type"] != f["type"] for f in old.raw["fields"]):
            continue
        added = [f for name, f in fields.items() if name not in kept]
        if all("default" in f for f in added):
            older.setdefault(old.name, []).append((old, {f["name"]: f["default"] for f in added}))
    return older


class Codec:
    """Parses every `.avsc` once; encodes records and decodes bytes by fingerprint."""

    def __init__(self) -> None:
        self.schemas = _load_schemas()
        # fingerprint -> (writer, reader): a previous writer is read as its current schema
        self._by_fingerprint = {s.fingerprint: (s, s) for s in self.schemas.values()}
        previous = _load_previous()
        for old in previous:
            self._by_fingerprint[old.fingerprint] = (old, self.schemas[old.name])
        self._older = _older_writers(self.schemas, previous)

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

    def encode_readable(self, name: str, record: Mapping[str, Any]) -> bytes:
        """encode(name, record), as the newest previous version of the schema that
        carries every value of `record` where there is one (the fields added since hold
        their defaults): readers of either version read it, and lose nothing."""
        older = self._older_fit(name, record)
        if older is None:
            return self.encode(name, record)
        out = io.BytesIO()
        out.write(older[0].prefix)
        try:
            schemaless_writer(out, older[0].parsed, dict(record))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerializationError(f"cannot encode {name}: {exc}") from exc
        return out.getvalue()

    def encode_readable_as(self, name: str, record: Mapping[str, Any], encoding: str) -> bytes:
        """encode_readable in `encoding`: in JSON, the fields added since the version it
        fits are left out (a reader from before refuses fields it does not know; one
        from now fills in their defaults)."""
        if encoding != JSON:
            return self.encode_readable(name, record)
        older = self._older_fit(name, record)
        if older is None:
            return self.encode_json(name, record)
        return self.encode_json(name, {k: v for k, v in record.items() if k not in older[1]})

    def _older_fit(self, name: str, record: Mapping[str, Any]) -> tuple[_Schema, dict[str, Any]] | None:
        for older, added in self._older.get(name, ()):
            if all(record.get(field, default) == default for field, default in added.items()):
                return older, added
        return None

    def encode_item(self, name: str, field: str, item: Mapping[str, Any]) -> bytes:
        """The Avro body of one item of array `field` of schema `name`, to store and splice later."""
        out = io.BytesIO()
        try:
            schemaless_writer(out, self.schemas[name].array_field(field).item, dict(item))
            return out.getvalue()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerializationError(f"cannot encode a {name}.{field} item: {exc}") from exc

    def decode_items(self, name: str, field: str, bodies: Sequence[bytes]) -> list[Any]:
        """Items stored by `encode_item`, decoded in one call."""
        if not bodies:
            return []
        data = _long(len(bodies)) + b"".join(bodies) + b"\x00"
        try:
            return schemaless_reader(io.BytesIO(data), self.schemas[name].array_field(field).array, None)  # type: ignore[return-value]
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise SerializationError(f"corrupt {name}.{field} items: {exc}") from exc

    def encode_with_items(self, name: str, record: Mapping[str, Any], field: str, bodies: Sequence[bytes]) -> bytes:
        """encode(name, record) with array `field` given as item bodies from `encode_item`
        (the record's own value for `field` is ignored). Same bytes as encoding the items."""
        schema = self.schemas[name]
        split = schema.array_field(field)
        fields = dict(record)
        out = io.BytesIO()
        out.write(schema.prefix)
        try:
            schemaless_writer(out, split.before, fields)
            if bodies:
                out.write(_long(len(bodies)))
                out.write(b"".join(bodies))
            out.write(b"\x00")
            schemaless_writer(out, split.after, fields)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerializationError(f"cannot encode {name}: {exc}") from exc
        return out.getvalue()

    def decode(self, data: bytes | None, expected: str | None = None) -> tuple[str, Record]:
        """Decodes single-object Avro; `expected` refuses any other schema."""
        if not data or len(data) < HEADER_LEN or data[:2] != MARKER:
            raise SerializationError("not Avro single-object encoding (no C3 01 marker)")
        found = self._by_fingerprint.get(data[2:HEADER_LEN])
        if found is None:
            raise SerializationError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        writer, schema = found
        if expected is not None and schema.name != expected:
            raise SerializationError(f"expected {expected}, got {schema.name}")
        try:
            reader = None if writer is schema else schema.parsed
            record = schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer.parsed, reader)
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
    """The content-type header's value; a header that is not UTF-8 text is the
    record's fault (SerializationError), never its batch's."""
    for key, value in headers or ():
        if not isinstance(key, str) or key.lower() != CONTENT_TYPE:
            continue
        if value is None:
            raise SerializationError("content-type header has no value")
        try:
            return value.decode() if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError as exc:
            raise SerializationError(f"content-type header is not UTF-8: {value[:40]!r}") from exc
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
