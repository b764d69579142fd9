"""Issue 25, item 7: a streamed text follows one generation of its request.

Two runs of one request can stream at once (a redelivery after a crash, or a
partition's new owner beside the revoked worker still finishing its row); their
chunks, each numbered from 0, meet on the reply topic. The caller's streamed text
must be one generation's, and end equal to `reply.text`.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from importlib import resources

import pytest
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_writer

from schemas import get_codec
from streams import Client, Reply
from streams.kafka import producer_config
from streams.outgoing import Outgoing, build_reply, chunk_message, reply_message
from streams.reply import Chunk
from streams.stitching import StreamStitcher
from tests.conftest import SettingsFactory
from tests.helpers import wait_for

A, B = "worker-a.0", "worker-b.0"  # two generations: two workers, each its first attempt


def _stitched(stitcher: StreamStitcher, chunks: list[Chunk], reply: Reply) -> list[Chunk]:
    out = [c for c in (stitcher.add(chunk) for chunk in chunks) if c is not None]
    return [*out, stitcher.end(reply)]


def streamed_text(chunks: list[Chunk]) -> str:
    """What a caller shows: the chunks' texts, a `restart` chunk replacing all before it."""
    text = ""
    for chunk in chunks:
        text = chunk.text if chunk.restart else text + chunk.text
    return text


def _ok(text: str) -> Reply:
    return Reply("r1", "ok", text=text, tokens_out=len(text.split()))


def test_two_generations_with_other_chunk_boundaries_stream_the_text_once() -> None:
    """The same greedy text, cut into chunks at other moments by each worker: by index
    across generations this was `The sky sky is blue` or worse."""
    chunks = [Chunk("r1", 0, "The sky", generation=A), Chunk("r1", 0, "The", generation=B)]
    chunks += [Chunk("r1", 1, " sky", generation=B), Chunk("r1", 2, " is", generation=B)]
    chunks += [Chunk("r1", 1, " is blue", generation=A)]
    out = _stitched(StreamStitcher("r1"), chunks, _ok("The sky is blue"))
    assert streamed_text(out) == "The sky is blue"
    assert [c.index for c in out] == list(range(len(out)))
    assert not any(c.restart for c in out)


def test_a_reply_from_the_generation_not_followed_restarts_the_text() -> None:
    """Sampled generations diverge; the reply comes from the one not streamed: its last
    chunk replaces the text streamed before."""
    chunks = [Chunk("r1", 0, "Blue", generation=A), Chunk("r1", 0, "Azure", generation=B)]
    chunks += [Chunk("r1", 1, ", mostly", generation=A)]
    out = _stitched(StreamStitcher("r1"), chunks, _ok("Azure, they say"))
    assert [c.text for c in out[:-1]] == ["Blue", ", mostly"]
    assert out[-1].restart and out[-1].text == "Azure, they say"
    assert streamed_text(out) == "Azure, they say"


def test_a_redelivery_takes_over_where_the_dead_generation_stopped() -> None:
    """The followed worker died after two chunks; its redelivery writes the same text
    and the stream goes on once it is past what the caller has."""
    chunks = [Chunk("r1", 0, "one", generation=A), Chunk("r1", 1, " two", generation=A)]
    chunks += [Chunk("r1", 0, "one two", generation=B), Chunk("r1", 1, " three", generation=B)]
    out = _stitched(StreamStitcher("r1"), chunks, _ok("one two three four"))
    assert [c.text for c in out] == ["one", " two", " three", " four"]
    assert out[2].generation == B


def test_chunks_without_a_generation_are_one_generation_and_a_repeat_is_skipped() -> None:
    """Chunks from before InferenceChunk v2 (no generation): a crash repeated indexes
    0, 1, ..., which are skipped as before."""
    chunks = [Chunk("r1", 0, "a"), Chunk("r1", 1, "b"), Chunk("r1", 0, "a"), Chunk("r1", 1, "b"), Chunk("r1", 2, "c")]
    out = _stitched(StreamStitcher("r1"), chunks, _ok("abcd"))
    assert [c.text for c in out] == ["a", "b", "c", "d"]


def test_a_reply_that_is_not_ok_ends_the_stream_without_text() -> None:
    out = _stitched(StreamStitcher("r1"), [Chunk("r1", 0, "half", generation=A)], Reply("r1", "expired"))
    assert out[-1].text == "" and not out[-1].restart and out[-1].reply is not None


def test_a_chunk_written_before_generations_is_read_with_an_empty_one() -> None:
    raw = json.loads(resources.files("schemas").joinpath("previous/inference_chunk.v1.avsc").read_text())
    old = parse_schema(raw, named_schemas={})
    codec = get_codec()
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    body = io.BytesIO()
    schemaless_writer(body, old, {"request_id": "r1", "index": 3, "text": "x", "tokens_out": 4, "sent_ms": 1})
    prefix = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(old), "CRC-64-AVRO"))
    name, record = codec.decode(prefix + body.getvalue())
    assert name == "InferenceChunk" and record["generation"] == "" and record["index"] == 3
    assert codec.decode(chunk_message("r1", 0, "y", 1, "t", generation=A).value)[1]["generation"] == A


@pytest.mark.same_on_any_broker
def test_two_generations_on_the_reply_topic_stream_the_reply_text(settings_factory: SettingsFactory) -> None:
    """On a real broker: the chunks of two generations of each request, produced by a
    real producer to the client's reply topic the way two workers would, in the
    interleavings above; what the client streams ends equal to `reply.text`."""
    settings = settings_factory(backpressure=False)
    cases = {
        "boundaries": (
            [(A, 0, "The sky"), (B, 0, "The"), (B, 1, " sky"), (B, 2, " is"), (A, 1, " is blue")],
            "The sky is blue",
        ),
        "diverged": ([(A, 0, "Blue"), (B, 0, "Azure"), (A, 1, ", mostly")], "Azure, they say"),
        "took_over": ([(A, 0, "one"), (A, 1, " two"), (B, 0, "one two"), (B, 1, " three")], "one two three four"),
    }

    async def scenario() -> dict[str, tuple[list[Chunk], Reply]]:
        producer = Producer(producer_config(settings))
        results: dict[str, tuple[list[Chunk], Reply]] = {}
        async with Client(settings=settings) as client:
            for name, (pieces, final_text) in cases.items():
                request_id = f"{name}-{uuid.uuid4().hex[:8]}"

                async def read(request_id: str = request_id) -> list[Chunk]:
                    messages = [{"role": "user", "content": "sky?"}]
                    return [c async for c in client.stream(messages, "s", request_id=request_id, deadline_s=30)]

                reading = asyncio.create_task(read())
                await asyncio.to_thread(wait_for, lambda: client.pending_count() == 1, 10, "the stream's request")
                records: list[Outgoing] = [
                    chunk_message(request_id, index, text, index + 1, client.reply_topic, generation=generation)
                    for generation, index, text in pieces
                ]
                request = {"request_id": request_id, "session_id": "s", "created_ms": int(time.time() * 1000)}
                reply = build_reply(request, "ok", text=final_text, tokens_out=4)
                records.append(reply_message(reply, client.reply_topic))
                for o in records:
                    producer.produce(o.topic, o.value, o.key, headers=o.headers)
                assert producer.flush(10) == 0
                got = await asyncio.wait_for(reading, 30)
                assert got[-1].reply is not None
                results[name] = (got, got[-1].reply)
        return results

    for name, (got, reply) in asyncio.run(scenario()).items():
        assert streamed_text(got) == reply.text, (name, [(c.text, c.restart) for c in got])
