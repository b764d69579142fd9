"""Token counting for the context budget, in the model's own tokenizer.

Counted once when a turn arrives and stored beside it in the history, so that
history is never re-tokenized.
"""

from __future__ import annotations

from typing import Any

# <|im_start|>{role}\n ... <|im_end|>\n  in the ChatML template
TURN_OVERHEAD = 5


class TokenCounter:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def count(self, content: str) -> int:
        """Tokens of one turn, chat markers included."""
        return len(self._tokenizer.encode(content, add_special_tokens=False)) + TURN_OVERHEAD

    def count_many(self, contents: list[str]) -> list[int]:
        if not contents:
            return []
        encoded = self._tokenizer(contents, add_special_tokens=False)["input_ids"]
        return [len(ids) + TURN_OVERHEAD for ids in encoded]

    def truncate(self, content: str, max_tokens: int, marker: str) -> str:
        """Cuts `content` to about `max_tokens` tokens (markers included), keeping the end."""
        ids = self._tokenizer.encode(content, add_special_tokens=False)
        keep = max(0, max_tokens - self.count(marker))
        return marker + self._tokenizer.decode(ids[len(ids) - keep :] if keep else [])
