"""Per-tenant quotas: requests and tokens per minute, GCRA in Redis.

The generic cell rate algorithm keeps one timestamp per bucket, the theoretical
arrival time (TAT): a request costing `n` moves it `n` emission intervals
(60,000 ms / limit) ahead, and passes while the new TAT is at most a minute ahead
of now (a minute's quota may be spent at once, then at the limit's pace). So the
exact retry time of a refused request is how far the new TAT overshoots that
minute. Both of a tenant's buckets are checked and moved in one script (one round
trip for the whole batch, pipelined), on Redis's own clock, so every processor
shares them. A request's tokens are its new turns' tokens plus its
`max_new_tokens`: what it may cost at most, known before the model runs.

Redis unreachable: requests pass (the stage goes on degraded, as for history).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from conversation.history import KEY_PREFIX, key_part
from streams.tenants import TenantPolicy, Tenants

MINUTE_MS = 60_000

# KEYS: QUOTAS_KEY, then the requests and tokens buckets as the release before kept
# them (string keys, the members' names): read, never written, for one release, so
# that the processors of the new release honour what the old ones spent.
# ARGV: per bucket its interval (ms per unit, 0: no limit) and cost, the burst, then
# the requests and tokens buckets' members.
# Returns {passed, retry_after_ms, requests_left, tokens_left, reset_ms}.
# The buckets are members of one sorted set without a TTL, scored by their TAT, so no
# volatile-* eviction can pick them (evicted, a bucket started full: quotas stopped);
# a bucket whose TAT has passed is full, the same as absent, and is pruned.
# `allow-oom` (Redis 7): past maxmemory with nothing evictable Redis refuses writes,
# and a quota that cannot be written stops refusing; this script's memory is two
# members per tenant, so it may run there (tests/test_redis_claims.py).
_GCRA = """#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local burst = tonumber(ARGV[5])
local wait, new, left = 0, {}, {}
for i = 1, 2 do
  local interval, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if interval > 0 then
    local tat = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[5 + i]) or now)
    local legacy = tonumber(redis.call('GET', KEYS[1 + i]) or now)
    if legacy > tat then tat = legacy end
    if tat < now then tat = now end
    new[i] = tat + interval * cost
    local over = new[i] - burst - now
    if over > wait then wait = over end
    left[i] = math.max(0, math.floor((burst - (new[i] - now)) / interval))
  else
    left[i] = -1
  end
end
if wait > 0 then return {0, math.ceil(wait), left[1], left[2], 0} end
local reset = 0
for i = 1, 2 do
  if new[i] then
    redis.call('ZADD', KEYS[1], new[i], ARGV[5 + i])
    if new[i] - now > reset then reset = new[i] - now end
  end
end
local full = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 64)
if #full > 0 then redis.call('ZREM', KEYS[1], unpack(full)) end
return {1, 0, left[1], left[2], math.ceil(reset)}
"""
QUOTAS_KEY = f"{KEY_PREFIX}quotas"
_GCRA_PLAIN = _GCRA.split("\n", 1)[1]  # without the shebang, for a Redis before 7 (it cannot parse one)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    passed: bool
    retry_after_ms: int
    requests_left: int  # -1: no limit
    tokens_left: int
    reset_ms: int  # until both buckets are full again


def _interval(per_minute: int) -> float:
    return MINUTE_MS / per_minute if per_minute else 0.0


def quota_keys(tenant: str) -> list[str]:
    """The tenant's requests and tokens buckets: members of QUOTAS_KEY."""
    part = key_part(tenant)
    return [f"{KEY_PREFIX}quota:req:{part}", f"{KEY_PREFIX}quota:tok:{part}"]


def too_large(policy: TenantPolicy, tokens: int) -> str | None:
    """Why a request can never pass its tenant's token quota, if it cannot."""
    if policy.tokens_per_minute and tokens > policy.tokens_per_minute:
        return f"request may cost {tokens} tokens, over the tenant's {policy.tokens_per_minute} per minute"
    return None


class Quotas:
    def __init__(self, redis: Redis, tenants: Tenants) -> None:
        self.redis = redis
        self.tenants = tenants
        self._script: Any = redis.register_script(_GCRA)
        self._plain: Any = redis.register_script(_GCRA_PLAIN)

    async def decide(self, asks: list[tuple[str, int]]) -> list[QuotaDecision | None]:
        """One decision per (tenant, tokens), in order, in one round trip; None where
        the tenant has no quota. Raises RedisError/OSError when Redis is unreachable."""
        decisions: list[QuotaDecision | None] = [None] * len(asks)
        limited = [i for i, (tenant, _) in enumerate(asks) if self._limited(self.tenants.policy(tenant))]
        if not limited:
            return decisions
        try:
            results = await self._run(asks, limited)
        except ResponseError as exc:
            if self._script is self._plain or not _refuses_shebang(exc):
                raise
            # a Redis before 7 compiles no shebang: the script without it, which Redis
            # refuses past maxmemory (quotas then stop there: Redis 7 is the one to run)
            log.warning("redis refuses the quota script's shebang (before Redis 7?): %s; without allow-oom", exc)
            self._script = self._plain
            results = await self._run(asks, limited)
        for i, result in zip(limited, results, strict=True):
            passed, retry, req_left, tok_left, reset = (int(x) for x in result)
            decisions[i] = QuotaDecision(bool(passed), max(1, retry) if not passed else 0, req_left, tok_left, reset)
        return decisions

    async def _run(self, asks: list[tuple[str, int]], limited: list[int]) -> list[Any]:
        """The script for each limited ask, in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in limited:
                tenant, tokens = asks[i]
                policy = self.tenants.policy(tenant)
                args = [
                    _interval(policy.requests_per_minute),
                    1,
                    _interval(policy.tokens_per_minute),
                    tokens,
                    MINUTE_MS,
                    *quota_keys(tenant),
                ]
                await self._script(keys=[QUOTAS_KEY, *quota_keys(tenant)], args=args, client=pipe)
            return list(await pipe.execute())

    @staticmethod
    def _limited(policy: TenantPolicy) -> bool:
        return bool(policy.requests_per_minute or policy.tokens_per_minute)


def _refuses_shebang(exc: ResponseError) -> bool:
    """Redis 6 cannot compile `#!lua ...`; Redis 7 names a flag it does not know."""
    text = str(exc).lower()
    return "compiling script" in text or "shebang" in text
