"""Crafted and generated records for the hostile-input tests, and the accounting that
proves each one was answered or dead-lettered.

A record sent to an input topic is accounted for when the dead-letter topic holds a
letter whose `source.*` headers name its topic, partition and offset, or when the
reply topic holds a reply keyed by its request id.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from schemas import SerializationError, get_codec
from streams.config import Settings
from tests.helpers import TopicReader, wait_for

JSON_HEADER = ("content-type", b"application/json")


@dataclass
class Sent:
    """One record as the broker stored it."""

    topic: str
    partition: int
    offset: int
    request_id: str | None  # where a reply may name it


def produce_all(
    bootstrap: str, records: list[tuple[str, bytes | None, list[tuple[str, Any]], str | None]]
) -> list[Sent]:
    """Produces (topic, value, headers, request_id) records, keyed by their index;
    returns where each landed, in the order given."""
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000, "linger.ms": 5})
    sent: list[Sent | None] = [None] * len(records)
    failed: list[str] = []

    def landed(err: Any, msg: Any, i: int) -> None:
        if err is not None:
            failed.append(err.str())
        else:
            sent[i] = Sent(msg.topic(), msg.partition(), msg.offset(), records[i][3])

    for i, (topic, value, headers, _request_id) in enumerate(records):
        while True:
            try:
                producer.produce(
                    topic, value, str(i).encode(), headers=headers, on_delivery=lambda e, m, i=i: landed(e, m, i)
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0 and not failed, failed[:3]
    assert all(s is not None for s in sent)
    return sent  # type: ignore[return-value]


class Accounts:
    """Reads the dead-letter and reply topics; says which sent records are not yet answered."""

    def __init__(self, settings: Settings) -> None:
        self.letters = TopicReader(settings, settings.topics.dead_letter)
        self.replies = TopicReader(settings, settings.topics.replies)

    def sources(self) -> dict[tuple[str, int, int], Any]:
        found = {}
        for m in self.letters.poll():
            h = dict(m.headers())
            found[(h["source.topic"].decode(), int(h["source.partition"]), int(h["source.offset"]))] = m
        return found

    def replied(self) -> dict[str, Any]:
        return {m.key().decode(errors="replace"): m for m in self.replies.poll()}

    def missing(self, sent: list[Sent]) -> list[Sent]:
        sources, replied = self.sources(), self.replied()
        return [
            s
            for s in sent
            if (s.topic, s.partition, s.offset) not in sources and (s.request_id is None or s.request_id not in replied)
        ]

    def wait_all(self, sent: list[Sent], timeout_s: float, records: list | None = None) -> None:
        """Waits until every sent record is accounted for; the failure names the first
        records left (and their values, given the records in the order sent)."""
        left: list[Sent] = []

        def done() -> bool:
            nonlocal left
            left = self.missing(sent)
            return not left

        try:
            wait_for(done, timeout_s, "every record answered or dead-lettered", interval_s=0.5)
        except AssertionError as exc:
            shown = (
                [(s, records[sent.index(s)][1][:300], records[sent.index(s)][2]) for s in left[:3]]
                if records
                else left[:3]
            )
            raise AssertionError(f"{exc}: {len(left)} of {len(sent)} unaccounted, first {shown}") from None

    def close(self) -> None:
        self.letters.close()
        self.replies.close()


def request(settings: Settings, request_id: str, **fields: Any) -> dict[str, Any]:
    """A valid request (as a dict for JSON), fields overridden."""
    return {
        "request_id": request_id,
        "session_id": f"s-{request_id}",
        "messages": [{"role": "user", "content": f"hello {request_id}"}],
        "reply_to": settings.topics.replies,
        "max_new_tokens": 8,
        **fields,
    }


def avro_request(settings: Settings, request_id: str, **fields: Any) -> dict[str, Any]:
    """A valid request with every field the Avro schema writes, fields overridden."""
    defaults = {
        "tenant": "default",
        "priority": "normal",
        "temperature": 0.0,
        "created_ms": 0,
        "deadline_ms": 0,
        "strategy": None,
        "metadata": {},
        "stream": False,
    }
    return {**request(settings, request_id), **defaults, **fields}


def envelope(settings: Settings, request_id: str, **fields: Any) -> dict[str, Any]:
    """A valid ContextEnvelope, fields overridden."""
    return {
        "version": 3,
        "request_id": request_id,
        "session_id": f"s-{request_id}",
        "tenant": "default",
        "reply_to": settings.topics.replies,
        "reply_encoding": "avro",
        "priority": "normal",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "created_ms": int(time.time() * 1000),
        "deadline_ms": 0,
        "system_prompt": None,
        "turns": [{"role": "user", "content": f"hello {request_id}", "tokens": 3}],
        "summary": None,
        "token_budget": 1024,
        "tokens_used": 3,
        "strategy": "window",
        "turns_dropped": 0,
        "degraded": False,
        "queued_ms": 0,
        "context_ms": 0,
        "forwarded_ms": int(time.time() * 1000),
        **fields,
    }


# -- generated records (hypothesis) -------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
_int32 = st.integers(-(2**31), 2**31 - 1)
_floats = st.floats(width=32) | st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 0.7])
_roles = st.sampled_from(["user", "assistant", "system"]) | st.text(max_size=10)
_headers = st.lists(
    st.tuples(st.sampled_from(["content-type", "Content-Type", "x"]) | st.text(max_size=12), st.binary(max_size=24)),
    max_size=3,
)


def _reply_to(settings: Settings) -> st.SearchStrategy[str]:
    replies = settings.topics.replies
    return st.sampled_from([replies, replies, f"{replies}.nope", settings.topics.contexts]) | st.text(max_size=30)


def _request_fields(settings: Settings) -> st.SearchStrategy[dict[str, Any]]:
    """Requests whose every field is either well typed (and maybe out of bounds) or random JSON."""
    typed = {
        "session_id": st.text(max_size=40),
        "tenant": st.text(max_size=20),
        "messages": st.lists(st.fixed_dictionaries({"role": _roles, "content": st.text(max_size=80)}), max_size=4),
        "priority": st.sampled_from(["low", "normal", "high"]) | st.text(max_size=8),
        "max_new_tokens": _int32,
        "temperature": _floats,
        "created_ms": st.integers(0, 2**62),
        "deadline_ms": st.integers(0, 2**62),
        "reply_to": _reply_to(settings),
        "strategy": st.none() | st.sampled_from(["window", "summary", "relevance"]) | st.text(max_size=10),
        "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    }
    return st.fixed_dictionaries({}, optional={k: v | _json for k, v in typed.items()})


def _envelope_fields(settings: Settings) -> st.SearchStrategy[dict[str, Any]]:
    """Envelope fields well typed for Avro, with values anywhere in their type."""
    return st.fixed_dictionaries(
        {
            "reply_to": _reply_to(settings),
            "max_new_tokens": _int32,
            "temperature": _floats,
            "tenant": st.text(max_size=20),
            "reply_encoding": st.sampled_from(["avro", "json"]) | st.text(max_size=6),
            "turns": st.lists(
                st.fixed_dictionaries({"role": _roles, "content": st.text(max_size=60), "tokens": _int32}), max_size=3
            ),
            "system_prompt": st.none() | st.text(max_size=40),
            "deadline_ms": st.sampled_from([0, 1]) | st.integers(0, 2**62),
        }
    )


def _mutated(data: bytes, cuts: list[int], flips: list[int]) -> bytes:
    b = bytearray(data)
    for i in flips:
        if b:
            b[i % len(b)] ^= 0xFF
    for i in cuts:
        if b:
            b = b[: i % len(b)]
    return bytes(b)


def generated_records(
    settings: Settings, topic: str, count: int, tag: str
) -> list[tuple[str, bytes, list, str | None]]:
    """`count` generated records for `topic` (the requests or the contexts topic): raw
    bytes, JSON with random or out-of-bounds fields, Avro with values anywhere in
    their types, Avro bytes cut short or flipped; random headers. Each carries a
    unique request id where it has one, so a reply can be matched to it."""
    codec = get_codec()
    out: list[tuple[str, bytes, list, str | None]] = []
    is_requests = topic == settings.topics.requests
    fields = _request_fields(settings) if is_requests else _envelope_fields(settings)
    shape = st.sampled_from(["raw", "json", "avro", "avro", "mutated"])

    @settings_for(count)
    @given(
        shape,
        st.binary(max_size=400),
        fields,
        _headers,
        st.lists(st.integers(0, 10**6), max_size=2),
        st.lists(st.integers(0, 10**6), max_size=3),
    )
    def one(kind: str, raw: bytes, record: dict[str, Any], headers: list, cuts: list[int], flips: list[int]) -> None:
        request_id = f"{tag}{len(out)}"
        if kind == "raw":
            out.append((topic, raw, headers, None))
            return
        if kind == "json" or (is_requests and not _avro_typed(record)):
            body = {**request(settings, request_id), **record} if is_requests else {**record, "request_id": request_id}
            try:
                value = orjson.dumps(body)
            except TypeError:
                value = raw
            out.append((topic, value, [JSON_HEADER, *headers[:1]], request_id))
            return
        full = avro_request(settings, request_id, **record) if is_requests else envelope(settings, request_id, **record)
        name = "InferenceRequest" if is_requests else "ContextEnvelope"
        try:
            value = codec.encode(name, full)
        except SerializationError:  # a value past its type's range: the raw bytes instead
            out.append((topic, raw, headers, None))
            return
        if kind == "mutated":
            value = _mutated(value, cuts, flips)
        out.append((topic, value, headers, request_id))

    one()
    return out[:count]


def _avro_typed(record: dict[str, Any]) -> bool:
    """Whether a generated request's fields fit the Avro schema's types (else it goes as JSON)."""
    types = {
        "session_id": str,
        "tenant": str,
        "messages": list,
        "priority": str,
        "max_new_tokens": int,
        "temperature": float,
        "created_ms": int,
        "deadline_ms": int,
        "reply_to": str,
        "metadata": dict,
    }
    for name, kind in types.items():
        if name in record and (not isinstance(record[name], kind) or isinstance(record[name], bool)):
            return False
    if "max_new_tokens" in record and not -(2**31) <= record["max_new_tokens"] < 2**31:
        return False
    if not isinstance(record.get("strategy"), str | None):
        return False
    messages = record.get("messages", [])
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        return False
    metadata = record.get("metadata", {})
    return all(isinstance(v, str) for v in metadata.values())


def settings_for(count: int) -> Any:
    """Hypothesis as a generator: `count` examples, no shrinking, no example database."""
    return hypothesis_settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
