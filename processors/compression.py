"""Context compression: which turns the model sees within the token budget.

The request's own messages always go in (cut with a marker if they alone exceed
the budget); a strategy decides which history turns join them:

- `window`: the newest turns that fit.
- `summary`: the newest turns that fit in 3/4 of the budget; the older ones are
  replaced by an extractive summary (first sentence of each, no model call).
- `relevance`: the newest turns that fit in half the budget, then the older turns
  most similar to the new question (all-MiniLM-L6-v2 cosine), in their original order.
- `prefix-stable`: history is dropped in whole epochs of `EPOCH_TURNS` turns, and
  the dropped epochs are summarized, so consecutive requests of a conversation
  share the same context prefix until the next epoch is dropped (a prefix cache
  can reuse it; rewriting the context every turn would defeat it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from conversation.history import Turn
from conversation.tokens import TURN_OVERHEAD, TokenCounter

CUT_MARKER = "[...cut to fit the context budget...] "
OMITTED = "[later turns omitted]"
EPOCH_TURNS = 8
SUMMARY_SHARE = 0.25
RECENT_SHARE = 0.5
PREFIX_SUMMARY_SHARE = 0.125
SUMMARY_WORDS = 24
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(slots=True)
class Context:
    """A compressed context: which history turns are kept (by index, so stored turns
    can go into the envelope as stored), then the request's own turns, cut to fit.
    `tokens_used` counts the summary."""

    history: Sequence[Turn]
    kept: list[int]
    new_turns: list[Turn]
    tokens_used: int
    turns_dropped: int
    strategy: str
    summary: str | None = None

    @property
    def turns(self) -> list[Turn]:
        return [self.history[i] for i in self.kept] + self.new_turns


@dataclass(slots=True)
class Inputs:
    history: Sequence[Turn]
    new_turns: list[Turn]
    budget: int
    counter: TokenCounter
    similarity: Sequence[float] | None = None  # per history turn, for `relevance`
    tokens: Sequence[int] = ()  # per history turn

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.history):
            stored = getattr(self.history, "tokens", None)  # StoredHistory: counts without decoding
            self.tokens = stored if stored is not None else [t["tokens"] for t in self.history]

    def context(self, kept: list[int], strategy: str, summary: str | None = None, summary_tokens: int = 0) -> Context:
        used = sum(self.tokens[i] for i in kept) + _tokens(self.new_turns) + summary_tokens
        dropped = len(self.history) - len(kept)
        return Context(self.history, kept, self.new_turns, used, dropped, strategy, summary)


Strategy = Callable[[Inputs], Context]


def _tokens(turns: Sequence[Turn]) -> int:
    return sum(t["tokens"] for t in turns)


def _newest_fitting(tokens: Sequence[int], budget: int) -> int:
    """Index of the oldest history turn kept when keeping the newest within `budget`."""
    used, start = 0, len(tokens)
    while start > 0 and used + tokens[start - 1] <= budget:
        start -= 1
        used += tokens[start]
    return start


def window(x: Inputs) -> Context:
    start = _newest_fitting(x.tokens, x.budget - _tokens(x.new_turns))
    return x.context(list(range(start, len(x.history))), "window")


def summarize(turns: Sequence[Turn], max_tokens: int, counter: TokenCounter) -> str | None:
    """The first sentence (at most SUMMARY_WORDS words) of each turn, oldest first,
    as many as fit in `max_tokens`: the oldest turns (where a conversation's setup
    and facts usually are) are kept; the ones just before the kept window are
    marked as omitted. Lines are tokenized in one batch, the result counted once."""
    if not turns or max_tokens <= 0:
        return None
    lines = []
    for t in turns:
        first = _SENTENCE_END.split(t["content"].strip(), maxsplit=1)[0]
        words = first.split()
        lines.append(f"{t['role']}: {' '.join(words[:SUMMARY_WORDS])}{'...' if len(words) > SUMMARY_WORDS else ''}")
    room = max_tokens - counter.count(OMITTED)
    kept: list[str] = []
    used = 0
    for line, tokens in zip(lines, counter.count_many(lines), strict=True):
        cost = tokens - TURN_OVERHEAD + 1  # the separator instead of chat markers
        if used + cost > room:
            break
        kept.append(line)
        used += cost
    text = " | ".join(kept) + (f" | {OMITTED}" if len(kept) < len(lines) else "")
    while kept and counter.count(text) > max_tokens:  # tokenizer merges across joins: rare
        kept.pop()
        text = " | ".join(kept) + f" | {OMITTED}"
    return text if kept else None


def _with_summary(x: Inputs, start: int, reserve: int, strategy: str) -> Context:
    """Turns from `start` on, the older ones summarized within `reserve` tokens."""
    text = summarize(x.history[:start], reserve, x.counter)
    return x.context(list(range(start, len(x.history))), strategy, text, x.counter.count(text) if text else 0)


def summary(x: Inputs) -> Context:
    new_tokens = _tokens(x.new_turns)
    if sum(x.tokens) + new_tokens <= x.budget:
        return dataclasses.replace(window(x), strategy="summary")
    reserve = int(x.budget * SUMMARY_SHARE)
    start = _newest_fitting(x.tokens, x.budget - new_tokens - reserve)
    return _with_summary(x, start, reserve, "summary")


def relevance(x: Inputs) -> Context:
    new_tokens = _tokens(x.new_turns)
    room = x.budget - new_tokens
    start = _newest_fitting(x.tokens, int(room * RECENT_SHARE))
    used = sum(x.tokens[start:])
    chosen: list[int] = []
    if x.similarity is not None:
        for i in sorted(range(start), key=lambda i: -x.similarity[i]):  # type: ignore[index]
            if used + x.tokens[i] <= room:
                chosen.append(i)
                used += x.tokens[i]
    return x.context(sorted(chosen) + list(range(start, len(x.history))), "relevance")


def prefix_stable(x: Inputs) -> Context:
    new_tokens = _tokens(x.new_turns)
    reserve = int(x.budget * PREFIX_SUMMARY_SHARE)
    room = x.budget - new_tokens - reserve
    start = 0
    while start < len(x.history) and sum(x.tokens[start:]) > room:
        start += EPOCH_TURNS
    return _with_summary(x, min(start, len(x.history)), reserve, "prefix-stable")


def reads_newest_only(strategy: str) -> bool:
    """`window` never looks past the newest turns that fit: the history store can
    send just those. The other strategies rank, summarize or epoch the whole history."""
    return strategy == "window"


STRATEGIES: dict[str, Strategy] = {
    "window": window,
    "summary": summary,
    "relevance": relevance,
    "prefix-stable": prefix_stable,
}


def fit_new_turns(new_turns: list[Turn], budget: int, counter: TokenCounter) -> list[Turn]:
    """Cuts the longest new turns (keeping their ends, marked) until they fit the budget.

    A turn larger than the budget on its own is cut, never dropped silently.
    """
    turns = [dict(t) for t in new_turns]
    while _tokens(turns) > budget:
        longest = max(turns, key=lambda t: t["tokens"])
        excess = _tokens(turns) - budget
        target = max(counter.count(CUT_MARKER), longest["tokens"] - excess)
        if target >= longest["tokens"]:
            break  # nothing left to cut: every turn is down to its marker
        longest["content"] = counter.truncate(longest["content"], target, CUT_MARKER)
        longest["tokens"] = counter.count(longest["content"])
    return turns


def compress(
    strategy: str,
    history: Sequence[Turn],
    new_turns: list[Turn],
    budget: int,
    counter: TokenCounter,
    similarity: Sequence[float] | None = None,
) -> Context:
    fitted = fit_new_turns(new_turns, budget, counter)
    return STRATEGIES[strategy](Inputs(history, fitted, budget, counter, similarity))
