"""What a remote pool's worker needs besides its calls: a runner for the worker's shared
code, the pace its provider's rpm and tpm allow, and its counters.

- `RemoteRunner` stands where a model runner stands (decoding, the response cache,
  history turns): it encodes nothing (the provider counts tokens: its usage is what the
  reply records) and generates nothing locally.
- `Pacer`: token buckets for the pool's `rpm` and `tpm`, at this worker's share (the
  limit over the pool's members): a call goes out only when both have room, so a pool
  keeps to its limits before its provider has to refuse it (from its first call: a
  bucket starts with room for one call, not a burst). A call's token cost is an
  estimate known before it is sent (its prompt at ~4 characters a token, plus its
  max_tokens), the way providers count it against tpm.
- `RemoteStats`: calls, their outcomes and the pauses, published to Redis with the
  workers' stats (`tidegate bench` and the tests read them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from conversation.tokens import TURN_OVERHEAD
from inference.exceptions import ModelError
from inference.runners import Generation, Prompt
from streams.fleet_remote import RemoteSpec

CHARS_PER_TOKEN = 4  # a prompt's tokens, estimated before the provider counts them
BURST_S = 1.0  # a bucket holds this much of its rate: providers enforce limits over short spans too


def estimate_tokens(prompt: Prompt) -> int:
    """The prompt's tokens as a provider would count them, roughly."""
    chars = sum(len(m["content"]) for m in prompt.messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + TURN_OVERHEAD * len(prompt.messages)


class RemoteRunner:
    """A runner whose model is at the provider: named by its `provider_model`."""

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self.name = spec.provider_model

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        raise ModelError("a remote pool generates at its provider (inference/remote_worker.py)")

    def encode(self, prompt: Prompt) -> tuple[list[int], int]:
        return [], 0

    def count_turn_tokens(self, generation: Generation) -> int:
        return generation.tokens_out + TURN_OVERHEAD


class Bucket:
    """A per-minute limit as a token bucket holding BURST_S of its rate (at least one
    unit). A cost larger than the bucket passes when the bucket is full and leaves it
    in debt, so one large call is paced, never refused for good.

    A bucket starts with room for its first call alone, not full: a worker starts (a
    restart, a scale-out) while its peers may keep the provider at its limit, and a
    full bucket sent BURST_S of its share at once into it, every call but the first
    refused (`tidegate bench provider`: those were all the 429s of a pool paced to
    its provider's limit). It fills while the worker has nothing to send, as the
    provider's own limit does."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.level: float | None = None  # until first used: then room for that call alone
        self.at = 0.0

    def _refill(self, share: int, now: float) -> tuple[float, float]:
        rate = self.per_minute / 60 / max(1, share)
        capacity = max(1.0, rate * BURST_S)
        if self.level is not None:
            self.level = min(capacity, self.level + (now - self.at) * rate)
        self.at = now
        return rate, capacity

    def wait_s(self, cost: float, share: int, now: float) -> float:
        rate, capacity = self._refill(share, now)
        need = min(cost, capacity)
        if self.level is None:
            self.level = need
        return 0.0 if self.level >= need else (need - self.level) / rate

    def spend(self, cost: float) -> None:
        assert self.level is not None
        self.level -= cost


class Pacer:
    """The pool's rpm and tpm at this worker's share; no limit where the file gives none."""

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.requests = Bucket(rpm) if rpm else None
        self.tokens = Bucket(tpm) if tpm else None

    def wait_s(self, tokens: int, share: int, now: float) -> float:
        """Seconds until a call of `tokens` may go (0: now)."""
        waits = [b.wait_s(c, share, now) for b, c in ((self.requests, 1), (self.tokens, tokens)) if b is not None]
        return max(waits, default=0.0)

    def spend(self, tokens: int) -> None:
        if self.requests is not None:
            self.requests.spend(1)
        if self.tokens is not None:
            self.tokens.spend(tokens)


@dataclass(slots=True)
class RemoteStats:
    calls: int = 0  # sent to the provider (a request sent again after a 429 counts again)
    ok: int = 0
    rate_limited: int = 0  # the provider's 429s
    errors: int = 0  # 5xx, timeouts, refused connections, unreadable answers
    invalid: int = 0  # 400, 413, 422
    cancelled: int = 0  # at the provider, because the caller went away or its deadline passed
    pauses_own: int = 0  # pauses this worker began on its own 429 (or spent limit)
    pauses_joined: int = 0  # pauses it began on another worker's record: it stopped without a 429
    paused_ms: int = 0
    prompt_tokens: int = 0  # the provider's usage
    completion_tokens: int = 0
