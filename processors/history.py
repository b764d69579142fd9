"""Conversation history in Redis: one list per (tenant, session), turns with token counts.

Keys escape tenant and session ids, so odd characters cannot reach another
tenant's keys. Every read and write for a batch goes in one pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, overload
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


class TokenCounts(Sequence[int]):
    """The token count of each stored turn, parsed from its prefix when first asked:
    a window walks back from the newest turn and stops at the budget."""

    def __init__(self, raw: list[bytes]) -> None:
        self._raw = raw
        self._parsed: list[int | None] = [None] * len(raw)

    def __len__(self) -> int:
        return len(self._raw)

    def _count(self, i: int) -> int:
        n = self._parsed[i]
        if n is None:
            entry = self._raw[i]
            n = self._parsed[i] = int(entry[: entry.index(b"\t")])
        return n

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self._count(i) for i in range(*index.indices(len(self)))]
        return self._count(index if index >= 0 else len(self) + index)


class StoredHistory(Sequence[Turn]):
    """A session's history as read from Redis: turns decoded, and their token counts
    parsed, only when a strategy looks at them (a window of a long history touches
    only the turns it keeps)."""

    def __init__(self, raw: list[bytes]) -> None:
        self._raw = raw
        self._decoded: dict[int, Turn] = {}
        self.tokens = TokenCounts(raw)

    def __len__(self) -> int:
        return len(self._raw)

    def _turn(self, i: int) -> Turn:
        turn = self._decoded.get(i)
        if turn is None:
            entry = self._raw[i]
            turn = orjson.loads(entry[entry.index(b"\t") + 1 :])
            turn["tokens"] = self.tokens[i]
            self._decoded[i] = turn
        return turn

    @overload
    def __getitem__(self, index: int) -> Turn: ...

    @overload
    def __getitem__(self, index: slice) -> list[Turn]: ...

    def __getitem__(self, index: int | slice) -> Turn | list[Turn]:
        if isinstance(index, slice):
            return [self._turn(i) for i in range(*index.indices(len(self)))]
        return self._turn(index if index >= 0 else len(self) + index)


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
