"""What a worker reads from and writes to Redis: cached responses, assistant turns, stats.

Redis is never on the critical path of a reply: when it is unreachable the worker
answers without the cache, skips the history append and the stats, logs why, and
leaves Redis alone for REDIS_RETRY_S (each call would wait out its socket timeout)
before it tries again; recovery is automatic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from conversation.history import KEY_PREFIX, HistoryWriter, cancel_key
from conversation.refused_writes import RefusedWrites
from conversation.response_cache import CachedReply, cache_key, cacheable, lookup, store
from inference.jobs import STAGE, Job
from inference.runners import Generation, ModelRunner
from streams import metrics
from streams.config import Settings
from streams.outgoing import now_ms

log = logging.getLogger(__name__)

STATS_KEY = f"{KEY_PREFIX}worker-stats:"  # + topic prefix + host:pid; a hash of EngineStats
REDIS_RETRY_S = 1.0


class SessionStore:
    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.history = HistoryWriter(settings.history_ttl_s, settings.history_max_turns, settings.tenant_max_sessions)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.repeats = 0  # requests generated again after a redelivery (their reply goes out again)
        self.refused = RefusedWrites(STAGE, log)
        self._down_until = 0.0

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _down(self, exc: Exception, skipped: str) -> None:
        metrics.REDIS_DEGRADED.labels(STAGE).set(1)
        if self._available():
            log.warning("redis unreachable, %s skipped for %.0fs: %s", skipped, REDIS_RETRY_S, exc)
        self._down_until = time.monotonic() + REDIS_RETRY_S

    def cancelled(self, jobs: Sequence[Job]) -> list[bool]:
        """Which jobs' callers went away (conversation/history.py cancel_key), in one
        MGET; none while Redis is unreachable."""
        if not jobs or not self._available():
            return [False] * len(jobs)
        keys = [cancel_key(j.envelope["tenant"], j.envelope["request_id"]) for j in jobs if j.envelope is not None]
        try:
            found = iter(self.redis.mget(keys)) if keys else iter(())
        except (redis.RedisError, OSError) as exc:
            self._down(exc, "cancellations")
            return [False] * len(jobs)
        return [j.envelope is not None and next(found) is not None for j in jobs]

    def cached(self, jobs: Sequence[Job]) -> list[Generation | None]:
        """Response-cache hits for greedy prompts, in one MGET; None where the model
        must run. Sets each cacheable job's key."""
        misses: list[Generation | None] = [None] * len(jobs)
        if not self.settings.response_cache_ttl_s or not self._available():
            return misses
        for j in jobs:
            if j.prompt is not None and cacheable(j.prompt.temperature):
                assert j.envelope is not None
                tenant = None if self.settings.response_cache_shared else j.envelope["tenant"]
                j.cache_key = cache_key(self.runner.name, j.prompt.messages, j.prompt.max_new_tokens, tenant)
        index = [i for i, j in enumerate(jobs) if j.cache_key is not None]
        if not index:
            return misses
        try:
            found = lookup(self.redis, [jobs[i].cache_key for i in index if jobs[i].cache_key])
        except (redis.RedisError, OSError) as exc:
            self._down(exc, "response cache")
            return misses
        for i, hit in zip(index, found, strict=True):
            if hit is not None:
                misses[i] = Generation(hit.text, hit.tokens_in, hit.tokens_out)
        return misses

    def remember(self, jobs: Sequence[Job], generated: Sequence[Generation]) -> None:
        """Stores greedy generations in the response cache. Entries Redis refuses (OOM)
        are counted as refused writes: Redis is not marked unreachable for them."""
        entries = [
            (j.cache_key, CachedReply(g.text, g.tokens_in, g.tokens_out))
            for j, g in zip(jobs, generated, strict=True)
            if j.cache_key is not None
        ]
        if not entries or not self._available():
            return
        try:
            store(self.redis, entries, self.settings.response_cache_ttl_s)
        except redis.ResponseError as exc:  # refused (OOM past maxmemory), not unreachable
            self.refused.note("response cache entries", exc, len(entries))
        except (redis.RedisError, OSError) as exc:
            self._down(exc, "response cache")

    def append_turns(self, jobs: Sequence[Job], generations: Sequence[Generation]) -> None:
        """The assistant turns, appended to each conversation's history in one pipeline,
        once per request id: a request generated again (a redelivery after a worker
        crashed past its reply) is counted in `repeats`, and its turn not appended.
        Then each answered session takes its place among its tenant's, the oldest
        past TENANT_MAX_SESSIONS losing their history.

        A command's own error (OOM past maxmemory, a key of the wrong type) costs that
        command only: counted and logged as a refused write (RefusedWrites), while
        Redis stays in use for every other tenant's turns, cancellations and cache."""
        if not self._available():
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for j, g in zip(jobs, generations, strict=True):
                    e = j.envelope
                    assert e is not None
                    turn = {"role": "assistant", "content": g.text, "tokens": self.runner.count_turn_tokens(g)}
                    forwarded = int(e.get("forwarded_ms") or 0)
                    self.history.append_once(pipe, e["request_id"], e["tenant"], e["session_id"], [turn], forwarded)
                for j in jobs:  # each tenant's share (TENANT_MAX_SESSIONS), after the answers
                    assert j.envelope is not None
                    self.history.bound_sessions(pipe, j.envelope["tenant"], j.envelope["session_id"])
                results = pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            self._down(exc, "assistant turns")
            return
        appended, bounds = results[: len(jobs)], results[len(jobs) :]
        for what, part in (("assistant turns", appended), ("sessions bound", bounds)):
            errors = [r for r in part if isinstance(r, Exception)]
            if errors:
                self.refused.note(what, errors[-1], len(errors))
        repeated = sum(1 for a in appended if not isinstance(a, Exception) and not a)
        self.repeats += repeated
        metrics.REPEATED_REQUESTS.inc(repeated)

    def publish_stats(self, key: str, stats: Any, batching: str) -> None:
        """Batching counters to a Redis hash (`tidegate bench batching` reads them)."""
        if not self._available():
            return
        fields: dict[str, Any] = {
            **dataclasses.asdict(stats),
            "repeated_requests": self.repeats,
            "batching": batching,
            "updated_ms": now_ms(),
        }
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, 3600)
                pipe.execute()
            metrics.REDIS_DEGRADED.labels(STAGE).set(0)
        except (redis.RedisError, OSError) as exc:
            self._down(exc, "stats")
