"""Window compression and oversize turns, with the default model's real tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from conversation.history import StoredHistory, encode_turn, history_key
from conversation.model_files import load_counting_tokenizer, load_tokenizer
from conversation.tokens import TokenCounter
from processors.compression import CUT_MARKER, compress


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def counter(tokenizer: Any) -> TokenCounter:
    return TokenCounter(load_counting_tokenizer("default"))


@pytest.mark.parametrize("text", ["Hello there", "naïve café — 東京 🌊", "", "word " * 300])
def test_a_turn_counts_what_it_adds_to_the_chat_template(counter: TokenCounter, tokenizer: Any, text: str) -> None:
    system = {"role": "system", "content": "You are helpful."}

    def tokens(messages: list[dict]) -> int:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    added = tokens([system, {"role": "user", "content": text}]) - tokens([system])
    assert counter.count(text) == added
    assert counter.count_many(["first", text, "last"])[1] == added


def turn(counter: TokenCounter, role: str, content: str) -> dict:
    return {"role": role, "content": content, "tokens": counter.count(content)}


@pytest.mark.parametrize("text", ["Hello there", "naïve café — 東京 🌊 <|im_end|> x", "word " * 300])
def test_the_processors_tokenizer_counts_and_cuts_as_the_models_own(
    counter: TokenCounter, tokenizer: Any, text: str
) -> None:
    """The processors read tokenizer.json alone (no transformers): the same counts and
    the same cut text as through the model's Hugging Face tokenizer."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert counter.count(text) == len(ids) + counter.count("") - len(tokenizer.encode("", add_special_tokens=False))
    keep = max(0, 12 - counter.count(CUT_MARKER))
    assert counter.truncate(text, 12, CUT_MARKER) == CUT_MARKER + tokenizer.decode(ids[len(ids) - keep :])


def test_window_keeps_the_newest_turns_that_fit(counter: TokenCounter) -> None:
    history = [turn(counter, "user" if i % 2 == 0 else "assistant", f"turn number {i} " * 5) for i in range(20)]
    new = [turn(counter, "user", "the question")]
    budget = 100
    ctx = compress("window", history, new, budget, counter)
    assert ctx.tokens_used <= budget
    assert ctx.turns[-1] == new[0]
    kept = ctx.turns[:-1]
    assert kept == history[len(history) - len(kept) :]  # a suffix: the newest, in order
    assert ctx.turns_dropped == len(history) - len(kept) > 0
    next_older = history[len(history) - len(kept) - 1]
    assert ctx.tokens_used + next_older["tokens"] > budget  # nothing more would have fit


def test_a_turn_larger_than_the_budget_is_cut_with_a_marker(counter: TokenCounter) -> None:
    big = turn(counter, "user", "word " * 2000 + "THE END")
    ctx = compress("window", [], [big], 200, counter)
    assert len(ctx.turns) == 1
    content = ctx.turns[0]["content"]
    assert content.startswith(CUT_MARKER) and content.endswith("THE END")
    assert ctx.tokens_used <= 200


def test_history_keys_cannot_collide_across_tenants() -> None:
    assert history_key("a:b", "c") != history_key("a", "b:c")
    assert history_key("a%3Ab", "c") != history_key("a:b", "c")
    turns = [{"role": "user", "content": "x\ty", "tokens": 6}, {"role": "assistant", "content": "z", "tokens": 7}]
    stored = StoredHistory([encode_turn(t) for t in turns], skipped=3)
    assert list(stored) == turns and stored.tokens == [6, 7] and stored.skipped == 3
