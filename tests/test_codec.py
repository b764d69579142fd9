"""Avro single-object encoding and JSON requests."""

from __future__ import annotations

import orjson
import pytest

from schemas import SerializationError, get_codec
from schemas.codec import MARKER

REQUEST = {
    "request_id": "r1",
    "session_id": "s1",
    "tenant": "acme",
    "messages": [{"role": "user", "content": "hi"}],
    "priority": "normal",
    "max_new_tokens": 8,
    "temperature": 0.0,
    "created_ms": 1,
    "deadline_ms": 2,
    "reply_to": "tidegate.replies",
    "strategy": None,
    "metadata": {},
    "stream": False,
    "model": "",
    "fallbacks": [],
}


def test_single_object_encoding_roundtrip_and_header() -> None:
    codec = get_codec()
    data = codec.encode("InferenceRequest", REQUEST)
    assert data[:2] == MARKER
    assert data[2:10] == codec.fingerprint("InferenceRequest")
    assert codec.decode(data) == ("InferenceRequest", REQUEST)


def test_fingerprints_are_distinct_per_schema() -> None:
    codec = get_codec()
    assert len({codec.fingerprint(n) for n in codec.schemas}) == len(codec.schemas)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "marker"),
        (b"\x00\x01garbage-bytes", "marker"),
        (MARKER + b"\x01" * 8 + b"body", "unknown schema fingerprint"),
    ],
)
def test_unreadable_bytes_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(SerializationError, match=why):
        get_codec().decode(data)


def test_truncated_body_is_refused() -> None:
    data = get_codec().encode("InferenceRequest", REQUEST)
    with pytest.raises(SerializationError, match="corrupt InferenceRequest"):
        get_codec().decode(data[:14])


def test_expected_schema_is_enforced() -> None:
    codec = get_codec()
    data = codec.encode("InferenceRequest", REQUEST)
    with pytest.raises(SerializationError, match="expected ContextEnvelope"):
        codec.decode(data, "ContextEnvelope")


def test_json_request_gets_defaults_and_is_validated() -> None:
    codec = get_codec()
    record = codec.decode_json(orjson.dumps({"request_id": "r", "session_id": "s", "messages": []}), "InferenceRequest")
    assert record["priority"] == "normal" and record["reply_to"] == "tidegate.replies"
    assert record["max_new_tokens"] == 64 and record["strategy"] is None
    with pytest.raises(SerializationError, match="does not match the schema"):
        codec.decode_json(orjson.dumps({"request_id": "r", "session_id": 5, "messages": []}), "InferenceRequest")
    with pytest.raises(SerializationError, match="unknown fields"):
        codec.decode_json(orjson.dumps({**REQUEST, "colour": "red"}), "InferenceRequest")
    with pytest.raises(SerializationError, match="invalid JSON"):
        codec.decode_json(b"{nope", "InferenceRequest")


def test_decode_message_picks_the_encoding_from_the_header() -> None:
    codec = get_codec()
    record, encoding = codec.decode_message(
        orjson.dumps(REQUEST), [("content-type", b"application/json")], "InferenceRequest"
    )
    assert encoding == "json" and record == REQUEST
    record, encoding = codec.decode_message(codec.encode("InferenceRequest", REQUEST), None, "InferenceRequest")
    assert encoding == "avro" and record == REQUEST


ENVELOPE = {
    "request_id": "r1",
    "session_id": "s1",
    "system_prompt": "Be brief.",
    "turns": [
        {"role": "user", "content": "héllo " * 40, "tokens": 70},
        {"role": "assistant", "content": "", "tokens": 5},
        {"role": "user", "content": "and?", "tokens": 8},
    ],
    "summary": None,
    "token_budget": 1024,
    "tokens_used": 83,
    "forwarded_ms": 1764250000000,
}


@pytest.mark.parametrize("count", [0, 1, 3, 70])
def test_stored_items_splice_into_the_same_bytes(count: int) -> None:
    codec = get_codec()
    turns = [ENVELOPE["turns"][i % 3] for i in range(count)]
    record = {**ENVELOPE, "turns": turns}
    bodies = [codec.encode_item("ContextEnvelope", "turns", t) for t in turns]
    spliced = codec.encode_with_items("ContextEnvelope", {**record, "turns": "ignored"}, "turns", bodies)
    assert spliced == codec.encode("ContextEnvelope", record)
    assert codec.decode_items("ContextEnvelope", "turns", bodies) == turns


def test_bad_items_are_refused() -> None:
    codec = get_codec()
    with pytest.raises(SerializationError, match="turns item"):
        codec.encode_item("ContextEnvelope", "turns", {"role": "user"})
    with pytest.raises(SerializationError, match="no array field"):
        codec.encode_item("ContextEnvelope", "summary", {})
    with pytest.raises(SerializationError, match="corrupt"):
        codec.decode_items("ContextEnvelope", "turns", [b"\x7f"])


def test_an_envelope_written_with_the_previous_schema_is_read_as_the_current_one() -> None:
    """A processor still on v1 (with `snippets`) keeps talking to an upgraded worker."""
    import io
    import json
    from importlib import resources

    from fastavro import parse_schema, schemaless_writer
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    raw = json.loads(resources.files("schemas").joinpath("previous/context_envelope.v1.avsc").read_text())
    v1 = parse_schema(raw, named_schemas={})
    record = {
        "version": 1,
        "request_id": "r1",
        "session_id": "s1",
        "turns": [{"role": "user", "content": "hi", "tokens": 6}],
        "snippets": [],
        "token_budget": 100,
        "tokens_used": 6,
    }
    out = io.BytesIO()
    out.write(MARKER + bytes.fromhex(fingerprint(to_parsing_canonical_form(v1), "CRC-64-AVRO")))
    schemaless_writer(out, v1, record)
    name, decoded = get_codec().decode(out.getvalue(), "ContextEnvelope")
    assert name == "ContextEnvelope"
    assert decoded["version"] == 1 and "snippets" not in decoded
    assert decoded["turns"] == [{"role": "user", "content": "hi", "tokens": 6}]


@pytest.mark.parametrize(
    ("name", "previous", "record"),
    [
        (
            "ContextEnvelope",
            "previous/context_envelope.v2.avsc",
            {"version": 2, "request_id": "r2", "session_id": "s", "turns": [], "token_budget": 9, "tokens_used": 1},
        ),
        (
            "InferenceRequest",
            "previous/inference_request.v1.avsc",
            {"request_id": "r1", "session_id": "s", "messages": [{"role": "user", "content": "hi"}]},
        ),
    ],
)
def test_records_from_before_streaming_are_read_as_not_streamed(name: str, previous: str, record: dict) -> None:
    """A stage still on the schemas before `stream` keeps talking to an upgraded one."""
    import io
    import json
    from importlib import resources

    from fastavro import parse_schema, schemaless_writer
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    old = parse_schema(json.loads(resources.files("schemas").joinpath(previous).read_text()), named_schemas={})
    out = io.BytesIO()
    out.write(MARKER + bytes.fromhex(fingerprint(to_parsing_canonical_form(old), "CRC-64-AVRO")))
    schemaless_writer(out, old, record)
    found, decoded = get_codec().decode(out.getvalue(), name)
    assert found == name and decoded["stream"] is False and decoded["request_id"] == record["request_id"]


def test_a_json_request_with_a_model_and_fallbacks_decodes_and_one_without_them_still_does() -> None:
    """The JSON request shape gains `model` and `fallbacks` (issue 26) compatibly: a
    plain producer may name them, and one written before fleets decodes as asking for
    the fleet's default model with its default chain."""
    codec = get_codec()
    fleet = {**REQUEST, "model": "gpt-4o-mini", "fallbacks": ["tiny", "smol"]}
    record, encoding = codec.decode_message(
        orjson.dumps(fleet), [("content-type", b"application/json")], "InferenceRequest"
    )
    assert encoding == "json" and record == fleet
    before = {k: v for k, v in REQUEST.items() if k not in ("model", "fallbacks")}
    record = codec.decode_json(orjson.dumps(before), "InferenceRequest")
    assert record["model"] == "" and record["fallbacks"] == [] and record["request_id"] == "r1"
    for bad in ({"model": 5}, {"fallbacks": "tiny"}, {"fallbacks": ["tiny", 7]}):
        with pytest.raises(SerializationError, match="does not match the schema"):
            codec.decode_json(orjson.dumps({**REQUEST, **bad}), "InferenceRequest")


def test_a_request_written_with_the_v2_schema_is_read_as_asking_for_the_default_model() -> None:
    """A client from before fleets (InferenceRequest v2: `stream`, no `model`) keeps
    talking to upgraded processors: its request reads as the current schema's, with
    `model` "" and no fallbacks."""
    import io
    import json
    from importlib import resources

    from fastavro import parse_schema, schemaless_writer
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    raw = json.loads(resources.files("schemas").joinpath("previous/inference_request.v2.avsc").read_text())
    v2 = parse_schema(raw, named_schemas={})
    record = {k: v for k, v in REQUEST.items() if k not in ("model", "fallbacks")} | {"stream": True}
    out = io.BytesIO()
    out.write(MARKER + bytes.fromhex(fingerprint(to_parsing_canonical_form(v2), "CRC-64-AVRO")))
    schemaless_writer(out, v2, record)
    assert out.getvalue()[2:10] != get_codec().fingerprint("InferenceRequest")  # another writer's schema
    name, decoded = get_codec().decode(out.getvalue(), "InferenceRequest")
    assert name == "InferenceRequest"
    assert decoded == {**record, "model": "", "fallbacks": []}
