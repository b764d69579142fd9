"""The transformers path, end to end, with the tiny random model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from inference.runners import Prompt, load_runner
from streams.client import Client
from streams.lag import WORKERS
from tests.conftest import Pipeline
from tests.helpers import wait_for_stage_lag

# the model runners: nothing a broker does differently
pytestmark = pytest.mark.same_on_any_broker


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
    assert [r.status for r in replies] == ["ok"] * 4
    assert all(r.model == "tiny" and 0 < r.tokens_out <= 6 for r in replies)
    assert all(r.timings.inference_ms > 0 for r in replies)


def test_continuous_batching_answers_mixed_requests_once_and_commits_all(
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    """Requests of mixed lengths and limits join a running batch; every one gets one
    `ok` reply, and the workers' group ends with no lag (each commit followed a reply)."""
    pipeline = pipeline_factory(model="tiny", torch_threads=1, max_batch=6, batch_tokens=400, batching="continuous")
    system = {"role": "system", "content": "You are the help desk of a shop that sells bicycles and their parts."}

    async def ask() -> list[dict]:
        async with Client(settings=pipeline.settings) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.generate(
                            [system, {"role": "user", "content": "wheel " * (3 + 17 * i)}],
                            f"mixed-{i}",
                            max_new_tokens=2 + 5 * (i % 4),
                            deadline_s=120,
                        )
                        for i in range(16)
                    )
                )
            )

    replies = asyncio.run(ask())
    assert [r.status for r in replies] == ["ok"] * 16
    assert all(0 < r.tokens_out <= 2 + 5 * (i % 4) for i, r in enumerate(replies))
    assert len({r.request_id for r in replies}) == 16
    wait_for_stage_lag(pipeline.settings, WORKERS, 0, 20)
