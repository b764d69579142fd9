"""Compression strategies on long histories, with the real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from processors.compression import EPOCH_TURNS, compress


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(load_counting_tokenizer("default"))


def conversation(counter: TokenCounter, n: int) -> list[dict]:
    turns = []
    for i in range(n):
        content = f"Turn {i} talks about topic {i % 7}. " + "More words here. " * (1 + i % 5)
        turns.append(
            {"role": "user" if i % 2 == 0 else "assistant", "content": content, "tokens": counter.count(content)}
        )
    return turns


def question(counter: TokenCounter, text: str) -> list[dict]:
    return [{"role": "user", "content": text, "tokens": counter.count(text)}]


@pytest.mark.parametrize("strategy", ["window", "summary", "relevance", "prefix-stable"])
def test_every_strategy_fits_the_budget_and_keeps_the_question(counter: TokenCounter, strategy: str) -> None:
    history = conversation(counter, 200)
    new = question(counter, "What did we say about topic 3?")
    sims = list(np.linspace(0, 1, len(history)))
    ctx = compress(strategy, history, new, 512, counter, sims)
    assert ctx.tokens_used <= 512
    assert ctx.turns[-1] == new[0]
    assert ctx.strategy == strategy
    assert ctx.turns_dropped == len(history) - (len(ctx.turns) - 1)
    kept = ctx.turns[:-1]
    positions = [history.index(t) for t in kept]
    assert positions == sorted(positions)  # original order


def test_summary_replaces_dropped_turns(counter: TokenCounter) -> None:
    history = conversation(counter, 100)
    ctx = compress("summary", history, question(counter, "and now?"), 512, counter)
    assert ctx.summary is not None and ctx.summary.startswith("user: Turn 0")  # the oldest turns first
    assert ctx.summary.endswith("[later turns omitted]")
    assert counter.count(ctx.summary) <= 512 // 4


def test_relevance_keeps_the_most_similar_old_turn(counter: TokenCounter) -> None:
    history = conversation(counter, 200)
    sims = [0.1] * len(history)
    sims[5] = 0.99  # the needle
    sims[6] = -0.5  # the least related old turn
    ctx = compress("relevance", history, question(counter, "needle?"), 512, counter, sims)
    assert history[5] in ctx.turns
    assert history[6] not in ctx.turns


def test_prefix_stable_keeps_the_same_prefix_across_turns(counter: TokenCounter) -> None:
    history = conversation(counter, 120)
    prefixes = []
    for extra in range(EPOCH_TURNS - 1):  # the conversation goes on, turn by turn
        grown = history + conversation(counter, extra)[:extra]
        ctx = compress("prefix-stable", grown, question(counter, "next?"), 1024, counter)
        assert ctx.turns_dropped % EPOCH_TURNS == 0
        prefixes.append((ctx.summary, ctx.turns[0]["content"]))
    assert len(set(prefixes)) <= 2  # changes at most once, when a whole epoch drops
    window_starts = {
        compress("window", history + conversation(counter, e)[:e], question(counter, "next?"), 1024, counter).turns[0][
            "content"
        ]
        for e in range(EPOCH_TURNS - 1)
    }
    assert len(window_starts) > 2  # a plain window rewrites its start nearly every turn
