"""Conversation history in Redis: one list per (tenant, session), turns with token counts.

Keys escape tenant and session ids, so odd characters cannot reach another
tenant's keys. Every read and write for a batch goes in one pipeline.

What Redis must hold for the guarantees, and what it may lose (docs/design.md,
"Bounded memory"): Redis runs `volatile-lru`, so under `maxmemory` the least
recently used keys with a TTL go first (long-idle conversations, old cache
entries). The request claims and answered marks are not such keys: they are members
of two sorted sets without a TTL (`CLAIMS_KEY`, `ANSWERED_KEY`, scored by when each
lapses, lapsed ones pruned as new ones come), which no `volatile-*` policy can
evict, so a redelivered request is still recognised, and its answer appended once,
however full Redis is. Quota buckets are kept the same way (processors/quotas.py).
The scripts, and how they order a request's turns, are in history_scripts.py.

One-shot sessions: a session id that starts with ONE_SHOT_PREFIX (the HTTP gateway
gives each OpenAI call one: the call carries its whole conversation) keeps no
history: its turns are not stored, its claim and answered mark last
ONE_SHOT_TTL_S. Kept for a day as before, every such call's prompt and answer
filled Redis until eviction took the quota buckets and cancel keys.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any, overload
from urllib.parse import quote

from conversation import history_scripts as scripts
from schemas import get_codec

KEY_PREFIX = "tidegate:"
Turn = dict[str, Any]  # {"role", "content", "tokens"}

# every tenant's request claims: member `<tenant>:<request id>`, score the Unix ms at
# which the claim lapses; no TTL of its own, so no volatile-* eviction can pick it
CLAIMS_KEY = f"{KEY_PREFIX}claims"
# how long a conversation's request stays claimed: longer than a redelivery takes (a
# processor that died past its claim and before its commit is replaced in seconds;
# a request older than its deadline is answered `expired` before any claim is read)
CLAIM_TTL_S = 3600
# every tenant's answered marks (a request's assistant turn is in its history: a
# redelivered generation never appends it twice), the same members, kept the same
# way as the claims and for as long; a mark lapses CLAIM_TTL_S after the answer
ANSWERED_KEY = f"{KEY_PREFIX}answered"
ONE_SHOT_PREFIX = "once:"
ONE_SHOT_TTL_S = 600  # a one-shot request's claim and answered mark


def key_part(part: str) -> str:
    """An id as one part of a Redis key."""
    return quote(part, safe="")  # ':' and '%' are escaped too: no two ids share a key


def history_key(tenant: str, session_id: str) -> str:
    # v2: turns stored as Avro (v1 lists were JSON: left to expire, never misread)
    return f"{KEY_PREFIX}history:v2:{key_part(tenant)}:{key_part(session_id)}"


def embeddings_key(tenant: str, session_id: str) -> str:
    """Hash of turn-content digest -> embedding (float16 bytes), beside the history."""
    return f"{KEY_PREFIX}emb:{key_part(tenant)}:{key_part(session_id)}"


def sessions_key(tenant: str) -> str:
    """A tenant's sessions with history, scored by their last answer (Unix ms): the
    oldest past the tenant's bound lose their history (HistoryWriter max_sessions)."""
    return f"{KEY_PREFIX}sessions:{key_part(tenant)}"


def content_digest(content: str) -> str:
    return hashlib.blake2b(content.encode(), digest_size=12).hexdigest()


def one_shot_session(name: str | None = None) -> str:
    """A session id whose history is not kept (ONE_SHOT_PREFIX + `name`, or a fresh id)."""
    return f"{ONE_SHOT_PREFIX}{name or uuid.uuid4().hex}"


def is_one_shot(session_id: str) -> bool:
    return session_id.startswith(ONE_SHOT_PREFIX)


def claim_member(tenant: str, request_id: str) -> str:
    """A processed request's claim in CLAIMS_KEY; per tenant, so one tenant's id never
    hides another's (both parts escaped: no two pairs share a member)."""
    return f"{key_part(tenant)}:{key_part(request_id)}"


def legacy_claim_key(tenant: str, request_id: str) -> str:
    """A claim as the release before wrote it (SET NX EX): read, never written, for one
    release, so that a rolling upgrade neither parks answers nor forwards twice."""
    return f"{KEY_PREFIX}seen:{key_part(tenant)}:{key_part(request_id)}"


def legacy_answered_key(tenant: str, request_id: str) -> str:
    """An answered mark as the release before wrote it: read, never written, for one release."""
    return f"{KEY_PREFIX}answered:{key_part(tenant)}:{key_part(request_id)}"


def early_answer_key(tenant: str, request_id: str) -> str:
    """A request's assistant turn appended before its own turns were: it waits here
    until the processors' claim appends the question, then the answer after it."""
    return f"{KEY_PREFIX}early:{key_part(tenant)}:{key_part(request_id)}"


def cancel_key(tenant: str, request_id: str) -> str:
    """Set when a request's caller went away (the gateway): a worker answers it
    `expired` instead of generating, or drops its row at the next decode step."""
    return f"{KEY_PREFIX}cancel:{key_part(tenant)}:{key_part(request_id)}"


CANCEL_TTL_S = 600  # longer than any request waits in the pipeline


# the turn's stored form is its Avro body as an item of ContextEnvelope.turns
ENVELOPE, TURNS = "ContextEnvelope", "turns"


def encode_turn(turn: Turn) -> bytes:
    """`<tokens>\t<Avro turn>`: the count is readable without decoding (the Lua script
    reads it), and the turn goes into an envelope as stored."""
    body = get_codec().encode_item(
        ENVELOPE, TURNS, {"role": turn["role"], "content": turn["content"], "tokens": turn["tokens"]}
    )
    return b"%d\t" % turn["tokens"] + body


class StoredHistory(Sequence[Turn]):
    """A session's history as read from Redis, oldest first: each turn's token count
    and Avro body. The turns are decoded (all in one call) only when a strategy reads
    their text; a window only counts tokens and forwards bodies. `skipped` older
    turns were left in Redis because the strategy could not have kept them."""

    def __init__(self, entries: Sequence[bytes] = (), skipped: int = 0) -> None:
        tabs = [entry.index(b"\t") for entry in entries]
        self.tokens = [int(entry[:tab]) for entry, tab in zip(entries, tabs, strict=True)]
        self.bodies = [entry[tab + 1 :] for entry, tab in zip(entries, tabs, strict=True)]
        self.skipped = skipped
        self._turns: list[Turn] | None = None

    def __len__(self) -> int:
        return len(self.bodies)

    @overload
    def __getitem__(self, index: int) -> Turn: ...

    @overload
    def __getitem__(self, index: slice) -> list[Turn]: ...

    def __getitem__(self, index: int | slice) -> Turn | list[Turn]:
        if self._turns is None:
            self._turns = get_codec().decode_items(ENVELOPE, TURNS, self.bodies)
        return self._turns[index]


def loaded_history(reply: list[Any] | None) -> StoredHistory | None:
    """The script's reply as a history; None for a request id claimed before."""
    if reply is None:
        return None
    total, kept = reply
    return StoredHistory(kept, skipped=int(total) - len(kept))


def held_claims(reply: Sequence[int]) -> list[bool]:
    """`lookup_claims`'s reply: per pair, whether its claim holds."""
    return [bool(held) for held in reply]


class HistoryWriter:
    """Queues history commands on a pipeline (sync or async redis alike).

    `max_sessions` bounds a tenant's share of Redis (0: no bound). Every session whose
    history is written enters its tenant's index (sessions_key) where its first turns
    are written, in the processors' claim, so that a request that ends expired,
    cancelled or in error counts too; the worker's `bound_sessions` moves it up after
    each answer. Past the bound the tenant's least recently used sessions lose their
    history and embeddings, as eviction would take them, but within the tenant: one
    tenant's many sessions cannot push out another's conversations. Without a bound
    (0) no index is kept."""

    def __init__(self, ttl_s: int, max_turns: int, max_sessions: int = 0) -> None:
        self.ttl_s = ttl_s
        self.max_turns = max_turns
        self.max_sessions = max_sessions

    def claim_lasts_s(self, session_id: str) -> int:
        """How long a request's claim and answered mark hold (CLAIM_TTL_S, ONE_SHOT_TTL_S)."""
        return ONE_SHOT_TTL_S if is_one_shot(session_id) else min(self.ttl_s, CLAIM_TTL_S)

    def append(self, pipe: Any, tenant: str, session_id: str, turns: Sequence[Turn]) -> None:
        if not turns or is_one_shot(session_id):
            return
        key = history_key(tenant, session_id)
        pipe.rpush(key, *(encode_turn(t) for t in turns))
        pipe.ltrim(key, -self.max_turns, -1)
        pipe.expire(key, self.ttl_s)

    def load(self, pipe: Any, request_id: str, tenant: str, session_id: str, room: int | None) -> None:
        """Queues the read of a request's history (step 1); its reply through
        `loaded_history` is None for a request processed before. `room`: tokens of
        newest history wanted, or None for the whole history."""
        args = [-1 if room is None else max(0, room), claim_member(tenant, request_id)]
        keys = CLAIMS_KEY, history_key(tenant, session_id), legacy_claim_key(tenant, request_id)
        pipe.eval(scripts.LOAD, 3, *keys, *args)

    def claim_append(self, pipe: Any, request_id: str, tenant: str, session_id: str, turns: Sequence[Turn]) -> None:
        """Queues the claim + append of a forwarded request (step 2); replies 1 when
        the claim is new and the turns were appended, 0 for a repeat. A one-shot
        session's request is claimed for ONE_SHOT_TTL_S and its turns are not kept."""
        once = is_one_shot(session_id)
        args: list[Any] = [self.ttl_s, self.max_turns, claim_member(tenant, request_id)]
        args += [self.claim_lasts_s(session_id), "0" if once else "1", self.max_sessions, key_part(session_id)]
        args += [history_key(tenant, ""), embeddings_key(tenant, "")]
        args += [] if once else [encode_turn(t) for t in turns]
        keys = (
            CLAIMS_KEY,
            history_key(tenant, session_id),
            early_answer_key(tenant, request_id),
            legacy_claim_key(tenant, request_id),
            sessions_key(tenant),
        )
        pipe.eval(scripts.CLAIM_APPEND, len(keys), *keys, *args)

    def lookup_claims(self, pipe: Any, requests: Sequence[tuple[str, str]]) -> None:
        """Queues one lookup of the claims of (tenant, request id) pairs; its reply
        through `held_claims` says, per pair, whether it was forwarded before."""
        legacy = [legacy_claim_key(tenant, rid) for tenant, rid in requests]
        members = [claim_member(tenant, rid) for tenant, rid in requests]
        pipe.eval(scripts.CLAIMED, 1 + len(legacy), CLAIMS_KEY, *legacy, *members)

    def append_once(
        self,
        pipe: Any,
        request_id: str,
        tenant: str,
        session_id: str,
        turns: Sequence[Turn],
        forwarded_ms: int = 0,
    ) -> None:
        """Queues the worker's assistant turns, appended once per request id and always
        after the request's own turns (step 3); replies 0 for a repeat. `forwarded_ms`
        (the envelope's; 0: unknown) tells an answer whose claim already ran and
        lapsed from one that came before its claim. A one-shot session's turns are
        not kept: only the answered mark, for ONE_SHOT_TTL_S."""
        lasts = self.claim_lasts_s(session_id)
        args: list[Any] = [lasts, self.ttl_s, self.max_turns, claim_member(tenant, request_id), forwarded_ms, lasts]
        args += [] if is_one_shot(session_id) else [encode_turn(t) for t in turns]
        keys = (
            ANSWERED_KEY,
            history_key(tenant, session_id),
            CLAIMS_KEY,
            early_answer_key(tenant, request_id),
            legacy_answered_key(tenant, request_id),
            legacy_claim_key(tenant, request_id),
        )
        pipe.eval(scripts.ANSWER_ONCE, len(keys), *keys, *args)

    def bound_sessions(self, pipe: Any, tenant: str, session_id: str) -> None:
        """Queues the session's place among its tenant's (max_sessions), after its
        answer; replies how many older sessions were dropped (at most PRUNE_LIMIT a
        call). Queues nothing where there is no bound, or for a one-shot session (it
        keeps no history)."""
        if not self.max_sessions or is_one_shot(session_id):
            return
        prefixes = history_key(tenant, ""), embeddings_key(tenant, "")
        args = [self.max_sessions, self.ttl_s, key_part(session_id), *prefixes]
        pipe.eval(scripts.BOUND_SESSIONS, 1, sessions_key(tenant), *args)

    def load_embeddings(self, pipe: Any, tenant: str, session_id: str) -> None:
        pipe.hgetall(embeddings_key(tenant, session_id))

    def store_embeddings(
        self, pipe: Any, tenant: str, session_id: str, vectors: dict[str, bytes], stale: Sequence[bytes] = ()
    ) -> None:
        """Stores new turn embeddings and drops `stale` ones (turns the history no
        longer holds): the hash stays as long as the history, never longer."""
        if is_one_shot(session_id):
            return
        key = embeddings_key(tenant, session_id)
        if stale:
            pipe.hdel(key, *stale)
        if vectors:
            pipe.hset(key, mapping=vectors)
            pipe.expire(key, self.ttl_s)
