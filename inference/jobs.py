"""A worker's unit of work: one record of the contexts topic, decoded once.

A record is decoded when it enters the batcher's pool (its prompt length decides
which batch it joins), and the Job is kept until the record is answered. A record
that does not decode becomes a Job that carries its dead letter instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from inference.runners import ModelRunner, Prompt
from schemas import SerializationError, get_codec
from streams.outgoing import Outgoing, dead_letter

STAGE = "workers"


@dataclass(slots=True)
class Job:
    """One record, decoded once when it entered the pool."""

    record: Message
    envelope: dict[str, Any] | None = None
    dead_letter: Outgoing | None = None
    prompt: Prompt | None = None
    ids: list[int] = dataclasses.field(default_factory=list)
    prefix_len: int = 0
    cache_key: str | None = None
    started_ms: int = 0  # taken from the pool

    def expired(self, now_ms: int) -> bool:
        return self.envelope is not None and 0 < self.envelope["deadline_ms"] < now_ms


def prompt_of(envelope: dict[str, Any]) -> Prompt:
    """What the model sees for an envelope: system prompt, summary of dropped turns, kept turns."""
    messages = [{"role": "system", "content": envelope["system_prompt"]}] if envelope["system_prompt"] else []
    if envelope["summary"]:
        messages.append({"role": "system", "content": f"Earlier in this conversation: {envelope['summary']}"})
    messages.extend({"role": t["role"], "content": t["content"]} for t in envelope["turns"])
    return Prompt(messages, envelope["max_new_tokens"], envelope["temperature"])


def decode_job(record: Message, runner: ModelRunner, dead_letter_topic: str) -> Job:
    """The record's envelope and prompt ids, or its dead letter when it does not decode."""
    job = Job(record)
    try:
        job.envelope = get_codec().decode(record.value(), "ContextEnvelope")[1]
    except SerializationError as exc:
        job.dead_letter = dead_letter(
            dead_letter_topic,
            record.value(),
            record.key(),
            reason=str(exc),
            source_topic=record.topic(),
            partition=record.partition(),
            offset=record.offset(),
            stage=STAGE,
        )
        return job
    job.prompt = prompt_of(job.envelope)
    job.ids, job.prefix_len = runner.encode(job.prompt)
    return job
