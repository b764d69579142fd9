"""Bounded memory: the prefix cache holds at most its bytes, and Redis runs with a memory limit and an
eviction policy in the dev stack and the compose file alike. (A conversation's cached
embeddings shrink with its history: tests/test_history.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch
import yaml

from inference.prefix_cache import PrefixCache, kv_bytes
from tidegate import devstack, processes

ROOT = Path(__file__).resolve().parents[1]


def _kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, 2, tokens, 8), torch.zeros(1, 2, tokens, 8)) for _ in range(2)]


def test_the_prefix_cache_holds_at_most_its_bytes() -> None:
    one = kv_bytes(_kv(100))  # 2 layers x (k, v) x 2 heads x 100 tokens x 8 dims x 4 bytes
    assert one == 2 * 2 * 2 * 100 * 8 * 4
    cache = PrefixCache(entries=100, min_tokens=1, max_bytes=3 * one)
    for i in range(10):
        cache.get((i,), lambda _ids: _kv(100))
        assert cache.bytes <= 3 * one
    assert cache.bytes == 3 * one and len(cache._kv) == 3
    cache.get((99,), lambda _ids: _kv(1000))  # larger than the whole cache: used, not kept
    assert cache.bytes == 3 * one and (99,) not in cache._kv


@pytest.mark.integration
def test_the_dev_stack_redis_has_a_memory_limit_and_an_eviction_policy(tmp_path: Path) -> None:
    port = processes.free_port()
    server = devstack.start_redis(port, tmp_path)
    try:
        client = redis.Redis(port=port)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == devstack.REDIS_EVICTION_POLICY
        assert int(client.config_get("maxmemory")["maxmemory"]) == 256 * 1024 * 1024
    finally:
        processes.stop_pid(server.pid)


def test_the_compose_redis_has_the_same_limit_and_policy() -> None:
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == devstack.REDIS_MAXMEMORY
    assert command[command.index("--maxmemory-policy") + 1] == devstack.REDIS_EVICTION_POLICY
