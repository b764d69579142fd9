"""What a worker reads from and writes to Redis: cached responses, assistant turns, stats.

Redis is never on the critical path of a reply: when it is unreachable the worker
answers without the cache, skips the history append and the stats, logs why, and
tries again on the next batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import redis

from conversation.history import KEY_PREFIX, HistoryWriter
from conversation.response_cache import CachedReply, cache_key, cacheable, lookup, store
from inference.jobs import Job
from inference.runners import Generation, ModelRunner
from streams.config import Settings
from streams.outgoing import now_ms

log = logging.getLogger(__name__)

STATS_KEY = f"{KEY_PREFIX}worker-stats:"  # + topic prefix + host:pid; a hash of EngineStats


class SessionStore:
    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.history = HistoryWriter(settings.history_ttl_s, settings.history_max_turns)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def cached(self, jobs: Sequence[Job]) -> list[Generation | None]:
        """Response-cache hits for greedy prompts, in one MGET; None where the model
        must run. Sets each cacheable job's key."""
        misses: list[Generation | None] = [None] * len(jobs)
        if not self.settings.response_cache_ttl_s:
            return misses
        for j in jobs:
            if j.prompt is not None and cacheable(j.prompt.temperature):
                j.cache_key = cache_key(self.runner.name, j.prompt.messages, j.prompt.max_new_tokens)
        index = [i for i, j in enumerate(jobs) if j.cache_key is not None]
        if not index:
            return misses
        try:
            found = lookup(self.redis, [jobs[i].cache_key for i in index if jobs[i].cache_key])
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; response cache skipped: %s", exc)
            return misses
        for i, hit in zip(index, found, strict=True):
            if hit is not None:
                misses[i] = Generation(hit.text, hit.tokens_in, hit.tokens_out)
        return misses

    def remember(self, jobs: Sequence[Job], generated: Sequence[Generation]) -> None:
        """Stores greedy generations in the response cache."""
        entries = [
            (j.cache_key, CachedReply(g.text, g.tokens_in, g.tokens_out))
            for j, g in zip(jobs, generated, strict=True)
            if j.cache_key is not None
        ]
        try:
            store(self.redis, entries, self.settings.response_cache_ttl_s)
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; responses not cached: %s", exc)

    def append_turns(self, jobs: Sequence[Job], generations: Sequence[Generation]) -> None:
        """The assistant turns, appended to each conversation's history in one pipeline."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for j, g in zip(jobs, generations, strict=True):
                    assert j.envelope is not None
                    turn = {"role": "assistant", "content": g.text, "tokens": self.runner.count_turn_tokens(g)}
                    self.history.append(pipe, j.envelope["tenant"], j.envelope["session_id"], [turn])
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; assistant turns not stored: %s", exc)

    def publish_stats(self, key: str, stats: Any, batching: str) -> None:
        """Batching counters to a Redis hash (`tidegate bench batching` reads them)."""
        fields: dict[str, Any] = {**dataclasses.asdict(stats), "batching": batching, "updated_ms": now_ms()}
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, 3600)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; stats not published: %s", exc)
