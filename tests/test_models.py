"""The transformers path, end to end, with the tiny random model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from inference.models import Prompt, load_runner
from streams.client import Client
from tests.conftest import Pipeline


def test_tiny_runner_respects_max_new_tokens_per_request() -> None:
    runner = load_runner("tiny", torch_threads=1)
    prompts = [Prompt([{"role": "user", "content": "hello " * n}], limit) for n, limit in ((1, 3), (40, 9))]
    generations = runner.generate(prompts)
    assert [g.tokens_out <= p.max_new_tokens for g, p in zip(generations, prompts, strict=True)] == [True, True]
    assert generations[1].tokens_in > generations[0].tokens_in


def test_pipeline_with_tiny_model_answers(pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(model="tiny", torch_threads=1)

    async def ask() -> list[dict]:
        async with Client(settings=pipeline.settings) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.generate([{"role": "user", "content": f"hi {i}"}], f"tiny-{i}", max_new_tokens=6)
                        for i in range(4)
                    )
                )
            )

    replies = asyncio.run(ask())
    assert [r["status"] for r in replies] == ["ok"] * 4
    assert all(r["model"] == "tiny" and 0 < r["tokens_out"] <= 6 for r in replies)
    assert all(r["timings"]["inference_ms"] > 0 for r in replies)
