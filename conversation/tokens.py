"""Token counting for the context budget, in the model's own tokenizer.

Counted once when a turn arrives and stored beside it in the history, so that
history is never re-tokenized.
"""

from __future__ import annotations

from typing import Any

# <|im_start|>{role}\n ... <|im_end|>\n  in the ChatML template
TURN_OVERHEAD = 5


class TokenCounter:
    """Counts through the Rust tokenizer (`tokenizers.Tokenizer`, conversation/model_files.py
    load_counting_tokenizer), not the Hugging Face wrapper around it: a count needs no
    Python lists of ids, which the wrapper builds for every text (64 short turns: about
    20 instead of 31 us per turn)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def count(self, content: str) -> int:
        """Tokens of one turn, chat markers included."""
        return len(self._backend.encode(content, add_special_tokens=False)) + TURN_OVERHEAD

    def count_many(self, contents: list[str]) -> list[int]:
        if not contents:
            return []
        return [len(e) + TURN_OVERHEAD for e in self._backend.encode_batch_fast(contents, add_special_tokens=False)]

    def truncate(self, content: str, max_tokens: int, marker: str) -> str:
        """Cuts `content` to about `max_tokens` tokens (markers included), keeping the end."""
        ids = self._backend.encode(content, add_special_tokens=False).ids
        keep = max(0, max_tokens - self.count(marker))
        return marker + self._backend.decode(ids[len(ids) - keep :] if keep else [], skip_special_tokens=False)
