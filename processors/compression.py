"""Context compression: which turns the model sees within the token budget.

The request's own messages always go in; a strategy decides which history turns
join them. Strategies are looked up by name in `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from processors.history import Turn
from processors.tokens import TokenCounter

CUT_MARKER = "[...cut to fit the context budget...] "


@dataclass(slots=True)
class Context:
    """A compressed context, ready for the envelope."""

    turns: list[Turn]
    tokens_used: int
    turns_dropped: int
    strategy: str
    summary: str | None = None


Strategy = Callable[[Sequence[Turn], Sequence[Turn], int], Context]


def window(history: Sequence[Turn], new_turns: Sequence[Turn], budget: int) -> Context:
    """The newest history turns that fit beside the new turns, oldest first."""
    used = sum(t["tokens"] for t in new_turns)
    kept: list[Turn] = []
    for turn in reversed(history):
        if used + turn["tokens"] > budget:
            break
        kept.append(turn)
        used += turn["tokens"]
    kept.reverse()
    return Context(kept + list(new_turns), used, len(history) - len(kept), "window")


STRATEGIES: dict[str, Strategy] = {"window": window}


def fit_new_turns(new_turns: list[Turn], budget: int, counter: TokenCounter) -> list[Turn]:
    """Cuts the longest new turns (keeping their ends, marked) until they fit the budget.

    A turn larger than the budget on its own is cut, never dropped silently.
    """
    turns = [dict(t) for t in new_turns]
    while sum(t["tokens"] for t in turns) > budget:
        longest = max(turns, key=lambda t: t["tokens"])
        excess = sum(t["tokens"] for t in turns) - budget
        target = max(counter.count(CUT_MARKER), longest["tokens"] - excess)
        if target >= longest["tokens"]:
            break  # nothing left to cut: every turn is down to its marker
        longest["content"] = counter.truncate(longest["content"], target, CUT_MARKER)
        longest["tokens"] = counter.count(longest["content"])
    return turns


def compress(
    strategy: str, history: Sequence[Turn], new_turns: list[Turn], budget: int, counter: TokenCounter
) -> Context:
    return STRATEGIES[strategy](history, fit_new_turns(new_turns, budget, counter), budget)
