"""Continuous batching against transformers' own generate, on the tiny random model."""

from __future__ import annotations

import pytest

from inference.engine import ContinuousEngine, Request
from inference.runners import Prompt, TransformersRunner, load_runner

SYSTEM = {"role": "system", "content": "You answer questions about the weather in one sentence, politely, always."}


@pytest.fixture(scope="module")
def runner() -> TransformersRunner:
    loaded = load_runner("tiny", torch_threads=1)
    assert isinstance(loaded, TransformersRunner)
    return loaded


def _prompts() -> list[Prompt]:
    questions = ["rain?", "Will it snow in the mountains next week, and how much? " * 6, "sun", "wind " * 30]
    return [Prompt([SYSTEM, {"role": "user", "content": q}], n) for q, n in zip(questions, (7, 12, 3, 9), strict=True)]


def _run_staggered(runner: TransformersRunner, engine: ContinuousEngine, prompts: list[Prompt]) -> dict[int, str]:
    """Two requests start; the others join after two steps, while the first still run."""
    requests = []
    for i, p in enumerate(prompts):
        ids, prefix_len = runner.encode(p)
        requests.append(Request(i, ids, p.max_new_tokens, p.temperature, prefix_len))
    done = {r.tag: r for r in engine.add(requests[:2])}
    for _ in range(2):
        done.update({r.tag: r for r in engine.step()})
    done.update({r.tag: r for r in engine.add(requests[2:])})
    for _ in range(200):
        if not engine.busy:
            break
        done.update({r.tag: r for r in engine.step()})
    assert not engine.busy
    return {i: runner.finish(r.out, len(r.ids)).text for i, r in done.items()}


@pytest.mark.parametrize("prefix_entries", [0, 4])
def test_joining_mid_batch_gives_the_same_tokens_as_generate(runner: TransformersRunner, prefix_entries: int) -> None:
    prompts = _prompts()
    expected = {i: g.text for i, g in enumerate(runner.generate(prompts))}
    engine = runner.engine(prefix_entries)
    assert _run_staggered(runner, engine, prompts) == expected
    stats = engine.stats
    assert stats.steps > 0 and 1 <= stats.mean_batch() <= len(prompts)
    if prefix_entries:
        assert engine.prefix_cache is not None and engine.prefix_cache.hits >= 1
        assert stats.prefix_reused > 0
    else:
        assert stats.prefix_reused == 0


def test_each_request_stops_at_its_own_max_new_tokens(runner: TransformersRunner) -> None:
    engine = runner.engine(0)
    limits = [1, 2, 5, 8]
    requests = [Request(n, runner.encode(Prompt([{"role": "user", "content": "go"}], n))[0], n) for n in limits]
    out = {r.tag: r for r in engine.add(requests)}
    while engine.busy:
        out.update({r.tag: r for r in engine.step()})
    assert sorted(out) == limits
    assert all(len(out[n].out) <= n for n in limits)
    assert engine.active == [] and engine.stats.rows_idle == 0


def test_sampled_and_greedy_rows_share_a_batch(runner: TransformersRunner) -> None:
    engine = runner.engine(0)
    ids = runner.encode(Prompt([{"role": "user", "content": "hello"}], 6))[0]
    greedy = [Request(f"g{i}", ids, 6, 0.0) for i in range(2)]
    sampled = [Request(f"s{i}", ids, 6, 1.5) for i in range(2)]
    out = {r.tag: r for r in engine.add([*greedy, *sampled])}
    while engine.busy:
        out.update({r.tag: r for r in engine.step()})
    assert out["g0"].out == out["g1"].out  # greedy rows agree, whatever their neighbours sample
    assert len(out) == 4
