"""A worker's unit of work: one record of the contexts topic, decoded once.

A record is decoded when it enters the batcher's pool (its prompt length decides
which batch it joins), and the Job is kept until the record is answered. A record
that does not decode, or cannot be replied to, becomes a Job that carries its dead
letter instead; one whose fields are out of bounds (any client allowed to write the
contexts topic can craft an envelope) carries the reason for an `invalid` reply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from inference.runners import ModelRunner, Prompt
from schemas import SerializationError, get_codec
from streams.config import Settings
from streams.outgoing import Outgoing, dead_letter
from streams.reply_topics import ReplyTopics
from streams.validation import field_reason

STAGE = "workers"


@dataclass(slots=True)
class Job:
    """One record, decoded once when it entered the pool."""

    record: Message
    envelope: dict[str, Any] | None = None
    dead_letter: Outgoing | None = None
    invalid: str | None = None  # why the envelope is refused with an `invalid` reply
    prompt: Prompt | None = None
    ids: list[int] = dataclasses.field(default_factory=list)
    prefix_len: int = 0
    cache_key: str | None = None
    started_ms: int = 0  # taken from the pool
    streamed: str = ""  # a streamed request's text sent in chunks so far
    chunks_sent: int = 0
    generation: str = ""  # a streamed run's name on its chunks: worker instance and attempt
    chunked_at: float = 0.0  # monotonic

    @property
    def streams(self) -> bool:
        return self.envelope is not None and bool(self.envelope.get("stream"))

    def expired(self, now_ms: int) -> bool:
        return self.envelope is not None and 0 < self.envelope["deadline_ms"] < now_ms


def prompt_of(envelope: dict[str, Any]) -> Prompt:
    """What the model sees for an envelope: system prompt, summary of dropped turns, kept turns."""
    messages = [{"role": "system", "content": envelope["system_prompt"]}] if envelope["system_prompt"] else []
    if envelope["summary"]:
        messages.append({"role": "system", "content": f"Earlier in this conversation: {envelope['summary']}"})
    messages.extend({"role": t["role"], "content": t["content"]} for t in envelope["turns"])
    return Prompt(messages, envelope["max_new_tokens"], envelope["temperature"])


def decode_job(record: Message, runner: ModelRunner, settings: Settings, reply_topics: ReplyTopics) -> Job:
    """One record's Job (`decode_jobs` of it alone)."""
    return decode_jobs([record], runner, settings, reply_topics)[0]


def decode_fetched(
    records: Sequence[Message],
    jobs: dict[tuple[str, int, int], Job],
    runner: ModelRunner,
    settings: Settings,
    reply_topics: ReplyTopics,
) -> None:
    """Decodes the records a fetch just returned, those not in `jobs` yet, into `jobs`
    (by topic, partition, offset): together, so that their unseen reply_to names cost
    one bounded listing for the fetch (the batcher calls it before they are pooled)."""
    fresh = [r for r in records if (r.topic(), r.partition(), r.offset()) not in jobs]
    for job in decode_jobs(fresh, runner, settings, reply_topics):
        jobs[(job.record.topic(), job.record.partition(), job.record.offset())] = job


def decode_jobs(
    records: Sequence[Message], runner: ModelRunner, settings: Settings, reply_topics: ReplyTopics
) -> list[Job]:
    """Each record's envelope and prompt ids; its dead letter when it does not decode
    or names a reply topic it cannot have; the reason when a field is out of bounds.
    Whatever goes wrong with one record stays with that record. The reply_to names
    none has asked about yet are decided in one listing, waiting at most the bounded
    `prepare_blocking` wait: before, each such name made a listing of its own (up to
    5 s each) while the running batch's rows waited for their next decode step."""
    jobs = [_decoded(record, settings) for record in records]
    reply_topics.prepare_blocking(j.envelope["reply_to"] for j in jobs if j.envelope is not None)
    for job in jobs:
        if job.envelope is not None:
            _checked(job, runner, settings, reply_topics)
    return jobs


def _decoded(record: Message, settings: Settings) -> Job:
    """The record's Job with its envelope, or with its dead letter when it does not decode."""
    job = Job(record)
    try:
        job.envelope = get_codec().decode(record.value(), "ContextEnvelope")[1]
    except SerializationError as exc:
        job.dead_letter = record_dead_letter(record, settings, str(exc))
    return job


def _checked(job: Job, runner: ModelRunner, settings: Settings, reply_topics: ReplyTopics) -> None:
    """A decoded job's reply topic and fields checked, its prompt encoded."""
    assert job.envelope is not None
    envelope = job.envelope
    try:
        unanswerable = reply_topics.reason(envelope["reply_to"], ask=False)  # decided by decode_jobs' listing
        if unanswerable is not None:
            job.envelope, job.prompt, job.ids = None, None, []
            job.dead_letter = record_dead_letter(job.record, settings, unanswerable)
            return
        job.invalid = field_reason(envelope, settings)
        if job.invalid is None:
            job.prompt = prompt_of(envelope)
            job.ids, job.prefix_len = runner.encode(job.prompt)
    except Exception as exc:  # a crafted envelope the model's chat template refuses, say
        job.prompt, job.ids = None, []
        job.invalid = f"the model cannot take this prompt: {exc}"


def record_dead_letter(record: Message, settings: Settings, reason: str) -> Outgoing:
    """`record` as a dead letter saying why."""
    return dead_letter(
        settings.topics.dead_letter,
        record.value(),
        record.key(),
        reason=reason,
        source_topic=record.topic(),
        partition=record.partition(),
        offset=record.offset(),
        stage=STAGE,
    )
