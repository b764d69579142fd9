"""Conversation history in Redis: one list per (tenant, session), turns with token counts.

Keys escape tenant and session ids, so odd characters cannot reach another
tenant's keys. Every read and write for a batch goes in one pipeline.

What Redis must hold for the guarantees, and what it may lose (docs/design.md,
"Bounded memory"): Redis runs `volatile-lru`, so under `maxmemory` the least
recently used keys with a TTL go first (long-idle conversations, old cache
entries). The request claims are not such keys: they are members of one sorted set
without a TTL (`CLAIMS_KEY`, scored by when each claim lapses, lapsed ones pruned
as new ones come), which no `volatile-*` policy can evict, so a redelivered request
is still recognised however full Redis is. Quota buckets are kept the same way
(processors/quotas.py).

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


def answered_key(tenant: str, request_id: str) -> str:
    """Set when a request's assistant turn is in the history: a redelivered generation
    (a worker crashed after the reply) never appends it twice."""
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


# Two steps per request, so that a crash between them loses nothing:
#
# 1. _LOAD, before the envelope is sent: a request whose claim holds was processed
#    before (an at-least-once redelivery) and gets nil: no envelope. Otherwise the
#    history is read; nothing is written. With room >= 0 only the newest turns whose
#    stored counts fit `room` tokens are read, from the tail in chunks: a window of a
#    long history moves a few turns, not all of them. Returns {turns in the list, kept}.
# 2. _CLAIM_APPEND, once the broker acknowledged the envelope: claim the request id
#    (in CLAIMS_KEY) and, if the claim is new, append the request's own turns, atomically.
#    A processor that dies between the two leaves no claim: the redelivered request
#    is read and forwarded again (the worker and the client drop the duplicate).
# 3. _ANSWER_ONCE, the worker's, once per request id (its `answered` key): the
#    assistant turn follows the request's claimed turns. A worker can answer before
#    step 2 ran (the envelope is on the contexts topic as soon as it is
#    acknowledged); its turn then waits under the request's `early` key, and step 2
#    appends it right after the question, in the same script: the history never
#    reads answer, question.
#
# Claims: KEYS[1] is CLAIMS_KEY, the request's member an ARGV; a claim holds while
# its score is in the future. Each new claim prunes up to 64 lapsed ones, as many as
# come in: the set holds about the claims of the last CLAIM_TTL_S.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function claimed(member)
  local lapses = redis.call('ZSCORE', KEYS[1], member)
  return lapses and tonumber(lapses) > now
end
"""

_LOAD = (
    _NOW
    + """
local room = tonumber(ARGV[1])
if claimed(ARGV[2]) then return false end
local total = redis.call('LLEN', KEYS[2])
local kept = {}
if room < 0 then
  kept = redis.call('LRANGE', KEYS[2], 0, -1)
elseif room > 0 then
  local newest, used, stop = {}, 0, -1
  while -stop <= total do
    local part = redis.call('LRANGE', KEYS[2], stop - 31, stop)
    local full = false
    for i = #part, 1, -1 do
      local n = tonumber(string.match(part[i], '^(%d+)\t')) or 0
      if used + n > room then full = true break end
      used = used + n
      newest[#newest + 1] = part[i]
    end
    if full then break end
    stop = stop - 32
  end
  for i = #newest, 1, -1 do kept[#kept + 1] = newest[i] end
end
return {total, kept}
"""
)

_CLAIM_APPEND = (
    _NOW
    + """
local ttl, max_turns, claim_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4]) * 1000
if claimed(ARGV[3]) then return 0 end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 64)
if #lapsed > 0 then redis.call('ZREM', KEYS[1], unpack(lapsed)) end
redis.call('ZADD', KEYS[1], now + claim_ms, ARGV[3])
local early = redis.call('LRANGE', KEYS[3], 0, -1)
if #early > 0 then redis.call('DEL', KEYS[3]) end
if ARGV[5] == '0' then return 1 end
if #ARGV > 5 or #early > 0 then
  if #ARGV > 5 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 6)) end
  if #early > 0 then redis.call('RPUSH', KEYS[2], unpack(early)) end
  redis.call('LTRIM', KEYS[2], -max_turns, -1)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""
)

# Which of ARGV's members hold a claim (1) or not (0): the processors ask it, in one
# call per batch, for the requests they would refuse before reading their history.
_CLAIMED = (
    _NOW
    + """
local held = {}
for i = 1, #ARGV do held[i] = claimed(ARGV[i]) and 1 or 0 end
return held
"""
)

_ANSWER_ONCE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl, max_turns = tonumber(ARGV[1]), tonumber(ARGV[2])
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ttl) then return 0 end
if #ARGV < 4 then return 1 end
local lapses = redis.call('ZSCORE', KEYS[3], ARGV[3])
if not lapses or tonumber(lapses) <= now then
  redis.call('RPUSH', KEYS[4], unpack(ARGV, 4))
  redis.call('EXPIRE', KEYS[4], ttl)
  return 1
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[2], -max_turns, -1)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""

# A tenant's share: KEYS[1] its sessions (sessions_key), ARGV: the bound, the TTL, the
# session's key part, the prefixes of its history and embeddings keys. The sessions
# past the bound, least recently answered first, are dropped with their history (keys
# named here, not in KEYS: one Redis, not a cluster).
_BOUND_SESSIONS = """
local bound, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000), ARGV[3])
redis.call('EXPIRE', KEYS[1], ttl)
local over = redis.call('ZCARD', KEYS[1]) - bound
if over <= 0 then return 0 end
local oldest = redis.call('ZRANGE', KEYS[1], 0, over - 1)
for _, session in ipairs(oldest) do
  redis.call('DEL', ARGV[4] .. session, ARGV[5] .. session)
end
redis.call('ZREM', KEYS[1], unpack(oldest))
return #oldest
"""


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

    `max_sessions` bounds a tenant's share of Redis (0: no bound): after its answers
    the worker queues `bound_sessions`, which records each session among its
    tenant's, and the tenant's least recently answered sessions past the bound lose
    their history and embeddings, as eviction would take them, but within the
    tenant: one tenant's many sessions cannot push out another's conversations."""

    def __init__(self, ttl_s: int, max_turns: int, max_sessions: int = 0) -> None:
        self.ttl_s = ttl_s
        self.max_turns = max_turns
        self.max_sessions = max_sessions

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
        pipe.eval(_LOAD, 2, CLAIMS_KEY, history_key(tenant, session_id), *args)

    def claim_append(self, pipe: Any, request_id: str, tenant: str, session_id: str, turns: Sequence[Turn]) -> None:
        """Queues the claim + append of a forwarded request (step 2); replies 1 when
        the claim is new and the turns were appended, 0 for a repeat. A one-shot
        session's request is claimed for ONE_SHOT_TTL_S and its turns are not kept."""
        once = is_one_shot(session_id)
        claim_s = ONE_SHOT_TTL_S if once else min(self.ttl_s, CLAIM_TTL_S)
        args = [self.ttl_s, self.max_turns, claim_member(tenant, request_id), claim_s, "0" if once else "1"]
        args += [] if once else [encode_turn(t) for t in turns]
        keys = CLAIMS_KEY, history_key(tenant, session_id), early_answer_key(tenant, request_id)
        pipe.eval(_CLAIM_APPEND, 3, *keys, *args)

    def lookup_claims(self, pipe: Any, requests: Sequence[tuple[str, str]]) -> None:
        """Queues one lookup of the claims of (tenant, request id) pairs; its reply
        through `held_claims` says, per pair, whether it was forwarded before."""
        pipe.eval(_CLAIMED, 1, CLAIMS_KEY, *(claim_member(tenant, rid) for tenant, rid in requests))

    def append_once(self, pipe: Any, request_id: str, tenant: str, session_id: str, turns: Sequence[Turn]) -> None:
        """Queues the worker's assistant turns, appended once per request id and always
        after the request's own turns (step 3); replies 0 for a repeat. A one-shot
        session's turns are not kept: only the answered mark, for ONE_SHOT_TTL_S."""
        once = is_one_shot(session_id)
        args = [ONE_SHOT_TTL_S if once else self.ttl_s, self.max_turns, claim_member(tenant, request_id)]
        args += [] if once else [encode_turn(t) for t in turns]
        keys = (
            answered_key(tenant, request_id),
            history_key(tenant, session_id),
            CLAIMS_KEY,
            early_answer_key(tenant, request_id),
        )
        pipe.eval(_ANSWER_ONCE, 4, *keys, *args)

    def bound_sessions(self, pipe: Any, tenant: str, session_id: str) -> None:
        """Queues the session's place among its tenant's (max_sessions), after its
        answer; replies how many older sessions were dropped. Queues nothing where
        there is no bound, or for a one-shot session (it keeps no history)."""
        if not self.max_sessions or is_one_shot(session_id):
            return
        prefixes = history_key(tenant, ""), embeddings_key(tenant, "")
        args = [self.max_sessions, self.ttl_s, key_part(session_id), *prefixes]
        pipe.eval(_BOUND_SESSIONS, 1, sessions_key(tenant), *args)

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
