"""Conversation history in Redis: one list per (tenant, session), turns with token counts.

Keys escape tenant and session ids, so odd characters cannot reach another
tenant's keys. Every read and write for a batch goes in one pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, overload
from urllib.parse import quote

import orjson

KEY_PREFIX = "tidegate:"
Turn = dict[str, Any]  # {"role", "content", "tokens"}


def _escape(part: str) -> str:
    return quote(part, safe="")  # ':' and '%' are escaped too: no two ids share a key


def history_key(tenant: str, session_id: str) -> str:
    return f"{KEY_PREFIX}history:{_escape(tenant)}:{_escape(session_id)}"


def embeddings_key(tenant: str, session_id: str) -> str:
    """Hash of turn-content digest -> embedding (float16 bytes), beside the history."""
    return f"{KEY_PREFIX}emb:{_escape(tenant)}:{_escape(session_id)}"


def content_digest(content: str) -> str:
    return hashlib.blake2b(content.encode(), digest_size=12).hexdigest()


def seen_key(request_id: str) -> str:
    return f"{KEY_PREFIX}seen:{_escape(request_id)}"


def encode_turn(turn: Turn) -> bytes:
    """`<tokens>\t{"role":..,"content":..}`: the count is readable without decoding the turn."""
    return b"%d\t" % turn["tokens"] + orjson.dumps({"role": turn["role"], "content": turn["content"]})


T = TypeVar("T")


class _LazySequence(Sequence[T]):
    """A read-only sequence over raw Redis entries whose items are made on first access."""

    def __init__(self, raw: list[bytes]) -> None:
        self._raw = raw
        self._made: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._raw)

    def _make(self, entry: bytes, i: int) -> T:
        raise NotImplementedError

    def _item(self, i: int) -> T:
        if i not in self._made:
            self._made[i] = self._make(self._raw[i], i)
        return self._made[i]

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        return self._item(index if index >= 0 else len(self) + index)


class TokenCounts(_LazySequence[int]):
    """The token count of each stored turn, parsed from its prefix when first asked:
    a window walks back from the newest turn and stops at the budget."""

    def _make(self, entry: bytes, i: int) -> int:
        return int(entry[: entry.index(b"\t")])


class StoredHistory(_LazySequence[Turn]):
    """A session's history as read from Redis: turns decoded, and their token counts
    parsed, only when a strategy looks at them (a window of a long history touches
    only the turns it keeps)."""

    def __init__(self, raw: list[bytes]) -> None:
        super().__init__(raw)
        self.tokens = TokenCounts(raw)

    def _make(self, entry: bytes, i: int) -> Turn:
        turn: Turn = orjson.loads(entry[entry.index(b"\t") + 1 :])
        turn["tokens"] = self.tokens[i]
        return turn


def decode_turns(raw: Iterable[bytes]) -> StoredHistory:
    return StoredHistory(list(raw))


class HistoryWriter:
    """Queues history commands on a pipeline (sync or async redis alike)."""

    def __init__(self, ttl_s: int, max_turns: int) -> None:
        self.ttl_s = ttl_s
        self.max_turns = max_turns

    def append(self, pipe: Any, tenant: str, session_id: str, turns: Sequence[Turn]) -> None:
        if not turns:
            return
        key = history_key(tenant, session_id)
        pipe.rpush(key, *(encode_turn(t) for t in turns))
        pipe.ltrim(key, -self.max_turns, -1)
        pipe.expire(key, self.ttl_s)

    def load(self, pipe: Any, tenant: str, session_id: str) -> None:
        pipe.lrange(history_key(tenant, session_id), 0, -1)

    def load_embeddings(self, pipe: Any, tenant: str, session_id: str) -> None:
        pipe.hgetall(embeddings_key(tenant, session_id))

    def store_embeddings(self, pipe: Any, tenant: str, session_id: str, vectors: dict[str, bytes]) -> None:
        if vectors:
            key = embeddings_key(tenant, session_id)
            pipe.hset(key, mapping=vectors)
            pipe.expire(key, self.ttl_s)

    def claim(self, pipe: Any, request_id: str) -> None:
        """SET NX: true the first time a request id is seen (dedupe after redelivery)."""
        pipe.set(seen_key(request_id), b"1", nx=True, ex=self.ttl_s)
