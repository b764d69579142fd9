"""Stages and callers of two versions side by side (issue 26's schemas): a record that
uses nothing the new schema added is written so that a reader from before it reads it.

Without this the upgrade had no safe order: a new client's requests (InferenceRequest
v3) were unknown to processors from before fleets, and a new worker's or processor's
replies (InferenceReply v2) to clients from before fleets, so processors had to be
upgraded before the clients and the clients before the processors; a client not
upgraded yet lost every reply, with no fleet file anywhere.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import Any

import orjson
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import AVRO, JSON, get_codec
from schemas.codec import HEADER_LEN, MARKER
from streams.client_requests import build_request, request_record
from streams.outgoing import build_reply, reply_message
from streams.request_options import RequestOptions

ENVELOPE: dict[str, Any] = {
    "request_id": "r1",
    "session_id": "s1",
    "tenant": "default",
    "reply_to": "tidegate.replies",
    "created_ms": 1,
    "queued_ms": 0,
    "context_ms": 0,
    "forwarded_ms": 0,
    "fallback_from": None,
    "fallback_reason": None,
}


def old_schema(path: str) -> tuple[bytes, Any, set[str]]:
    """(fingerprint, parsed schema, field names) of a schema a reader from before knows."""
    raw = json.loads(resources.files("schemas").joinpath(path).read_text())
    parsed = parse_schema(raw, named_schemas={})
    return (
        bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")),
        parsed,
        {f["name"] for f in raw["fields"]},
    )


def new_request(options: RequestOptions) -> dict[str, Any]:
    return build_request([{"role": "user", "content": "hi"}], "s1", options, tenant="t", reply_to="r")


def read_as_before(data: bytes, path: str) -> dict[str, Any]:
    """What a reader that knows only `path` as its current schema reads (the codec
    of that version refuses an unknown fingerprint)."""
    known, parsed, _ = old_schema(path)
    assert data[:2] == MARKER
    assert data[2:HEADER_LEN] == known, "a reader from before fleets does not know this record's schema"
    return schemaless_reader(io.BytesIO(data[HEADER_LEN:]), parsed, None)  # type: ignore[return-value]


def test_a_reply_no_fallback_served_is_read_by_a_client_from_before_fleets() -> None:
    reply = build_reply(ENVELOPE, "ok", text="hi", model="smol")
    out = reply_message(reply, "tidegate.replies", AVRO)
    old = read_as_before(out.value, "previous/inference_reply.v1.avsc")
    assert (old["request_id"], old["status"], old["text"], old["model"]) == ("r1", "ok", "hi", "smol")
    # and an upgraded client reads it whole, the fallback fields empty
    name, record = get_codec().decode(out.value, "InferenceReply")
    assert name == "InferenceReply" and record == reply


def test_a_refusal_is_read_by_a_client_from_before_fleets() -> None:
    """The processors' replies (queue_full, invalid) go the same way."""
    why = "stage workers lag 9 is past its cap 8"
    reply = build_reply(new_request(RequestOptions()), "queue_full", error=why, retry_after_ms=50)
    old = read_as_before(reply_message(reply, "r", AVRO).value, "previous/inference_reply.v1.avsc")
    assert (old["status"], old["retry_after_ms"]) == ("queue_full", 50)


def test_a_reply_a_fallback_served_says_so_in_the_current_schema() -> None:
    envelope = {**ENVELOPE, "fallback_from": "smol", "fallback_reason": "full"}
    reply = build_reply(envelope, "ok", text="hi", model="tiny")
    out = reply_message(reply, "tidegate.replies", AVRO)
    assert out.value[2:HEADER_LEN] == get_codec().fingerprint("InferenceReply")
    record = get_codec().decode(out.value, "InferenceReply")[1]
    assert (record["model"], record["fallback_from"], record["fallback_reason"]) == ("tiny", "smol", "full")


def test_a_json_reply_no_fallback_served_has_only_the_fields_it_had_before_fleets() -> None:
    """A JSON reader from before (tidegate's own refuses unknown fields) reads it; an
    upgraded one fills the fallback fields in as empty."""
    reply = build_reply(ENVELOPE, "ok", text="hi", model="smol")
    value = reply_message(reply, "tidegate.replies", JSON).value
    _, _, before = old_schema("previous/inference_reply.v1.avsc")
    assert set(orjson.loads(value)) <= before
    assert get_codec().decode_json(value, "InferenceReply") == reply
    with_fallback = build_reply({**ENVELOPE, "fallback_from": "smol", "fallback_reason": "full"}, "ok", model="tiny")
    assert orjson.loads(reply_message(with_fallback, "r", JSON).value)["fallback_from"] == "smol"


def test_a_request_naming_no_model_is_read_by_processors_from_before_fleets() -> None:
    request = new_request(RequestOptions())
    old = read_as_before(request_record(request, "tidegate.requests").value, "previous/inference_request.v2.avsc")
    assert old["request_id"] == request["request_id"] and old["messages"] == request["messages"]
    assert get_codec().decode(request_record(request, "q").value, "InferenceRequest")[1] == request
    # one naming a model needs processors that route it: the current schema
    named = new_request(RequestOptions(model="smol"))
    value = request_record(named, "q").value
    assert value[2:HEADER_LEN] == get_codec().fingerprint("InferenceRequest")
    assert get_codec().decode(value, "InferenceRequest")[1]["model"] == "smol"
