"""The `relevance` strategy's similarity scores, and its fallback when it has no model.

The embedding model comes in an optional wheel (processors/embeddings.py); where it
is missing or does not load, a `relevance` request is built with `window` instead
(the newest turns that fit), marked `degraded` in its envelope and reply, and the
envelope's `strategy` says `window`: the caller gets an answer from its recent
context rather than an `error` for a deployment's missing file, and can tell it
was not ranked. Failing the whole batch instead (as before) dead-lettered up to
64 requests of any tenant and answered none. A model that failed to load is
tried again after LOAD_RETRY_S, not on every batch (a load takes seconds).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import numpy as np

from conversation.history import StoredHistory, Turn, content_digest
from processors.embeddings import Embedder, EmbeddingError, from_bytes, to_bytes

log = logging.getLogger(__name__)

FALLBACK = "window"
LOAD_RETRY_S = 60.0


class Scored(Protocol):
    """What scoring reads and fills in (the handler's accepted request)."""

    request: dict[str, Any]
    strategy: str
    new_turns: list[Turn]
    history: StoredHistory
    cached_vectors: dict[bytes, bytes]
    new_vectors: dict[str, bytes]
    similarity: list[float] | None
    degraded: bool


class RelevanceScorer:
    def __init__(self) -> None:
        self.embedder: Embedder | None = None  # loaded on the first `relevance` request
        self._retry_at = 0.0  # monotonic: when a failed load may be tried again
        self._load_error = ""

    def score_or_fall_back(self, items: list[Scored]) -> None:
        """Fills each item's similarity, or falls it back to `window`. Runs in a
        thread (the model). A failure with one item (a cached vector of the wrong
        size) falls back that item alone."""
        try:
            self._score(items)
            return
        except EmbeddingError as exc:
            self._fall_back(items, str(exc))
            return
        except Exception:
            log.exception("scoring a batch of %d relevance requests failed; scoring each alone", len(items))
        for item in items:
            try:
                self._score([item])
            except Exception as exc:
                self._fall_back([item], repr(exc))

    def _model(self) -> Embedder:
        if self.embedder is None:
            if time.monotonic() < self._retry_at:
                raise EmbeddingError(self._load_error)
            try:
                self.embedder = Embedder()
            except Exception as exc:
                self._retry_at = time.monotonic() + LOAD_RETRY_S
                self._load_error = f"the embedding model did not load: {exc}"
                raise EmbeddingError(self._load_error) from exc
        return self.embedder

    @staticmethod
    def _fall_back(items: list[Scored], why: str) -> None:
        log.warning("%d relevance requests built with %s instead: %s", len(items), FALLBACK, why)
        for item in items:
            item.strategy = FALLBACK
            item.similarity = None
            item.new_vectors.clear()
            item.degraded = True

    def _score(self, items: list[Scored]) -> None:
        """Similarity of every history turn to the new question; embeds only what is
        not cached yet (each turn is embedded once, then stored in Redis)."""
        embedder = self._model()
        digests = [[content_digest(turn["content"]) for turn in item.history] for item in items]
        missing: dict[str, str] = {}
        for item, item_digests in zip(items, digests, strict=True):
            for turn, digest in zip(item.history, item_digests, strict=True):
                if digest.encode() not in item.cached_vectors:
                    missing[digest] = turn["content"]
        questions = [next((t["content"] for t in reversed(i.new_turns) if t["role"] == "user"), "") for i in items]
        vectors = embedder.embed(list(missing.values()) + questions)
        computed = {d: to_bytes(v) for d, v in zip(missing, vectors, strict=False)}
        for item, item_digests, text, question in zip(items, digests, questions, vectors[len(missing) :], strict=True):
            item.new_vectors[content_digest(text)] = to_bytes(question)  # the question becomes a history turn
            rows = []
            for digest in item_digests:
                if digest in computed:
                    item.new_vectors[digest] = computed[digest]
                    rows.append(from_bytes(computed[digest]))
                else:
                    rows.append(from_bytes(item.cached_vectors[digest.encode()]))
            item.similarity = (np.stack(rows) @ question).tolist() if rows else []
