"""A remote pool whose provider cannot answer (issue 27, item 2), on the real broker: a
refused connection and a server that accepts but never answers are `error` replies,
each request answered once, and the outcomes reporter's counts open the pool's
circuit (ops/breaker.py) as a local pool's failing model does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams import Client
from streams.pressure_feed import PressureListener
from tests.conftest import Pipeline
from tests.helpers import wait_for
from tidegate.processes import free_port

pytestmark = [pytest.mark.integration, pytest.mark.same_on_any_broker]

FLEET = """
models:
  gone: {{}}
  mute: {{}}
pools:
  gone:
    engine: openai
    base_url: "http://127.0.0.1:{gone}/v1"
    provider_model: m
    max_in_flight: 2
    models: [gone]
    partitions: 2
  mute:
    engine: openai
    base_url: "http://127.0.0.1:{mute}/v1"
    provider_model: m
    max_in_flight: 2
    timeout_s: 0.5
    models: [mute]
    partitions: 2
"""


@pytest.fixture(scope="module")
def mute_server() -> Iterator[int]:
    """A port that takes connections into its backlog and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_refused_connections_and_timeouts_are_errors_that_open_the_pools_circuit(
    pipeline_factory: Callable[..., Pipeline], tmp_path_factory: pytest.TempPathFactory, mute_server: int
) -> None:
    path = Path(tmp_path_factory.mktemp("remote-errors")) / "fleet.yaml"
    path.write_text(FLEET.format(gone=free_port(), mute=mute_server))
    pipeline = pipeline_factory(roles=(), fleet_file=str(path), circuit_min_replies=4, circuit_window_s=10.0)
    pipeline.start(("monitor", "processor"))
    pipeline.start(("worker-gone",), extra_env={"TIDEGATE_POOL": "gone"})
    pipeline.start(("worker-mute",), extra_env={"TIDEGATE_POOL": "mute"})

    async def ask(model: str) -> list:
        async with Client(settings=pipeline.settings) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.generate(
                            [{"role": "user", "content": f"q{i}"}], f"{model}-{i}", model=model, deadline_s=30
                        )
                        for i in range(6)
                    )
                )
            )

    gone = asyncio.run(ask("gone"))
    assert [r.status for r in gone] == ["error"] * 6, [(r.status, r.error) for r in gone]
    assert all("cannot reach the provider" in (r.error or "") for r in gone), gone[0].error
    mute = asyncio.run(ask("mute"))
    assert [r.status for r in mute] == ["error"] * 6, [(r.status, r.error) for r in mute]
    assert all("no answer within 0.5s" in (r.error or "") for r in mute), mute[0].error
    watch = PressureListener(pipeline.settings)
    watch.start()
    try:
        for stage in ("workers.gone", "workers.mute"):
            wait_for(
                lambda stage=stage: (
                    (s := watch.board.state(stage)) and s["circuit"] == "open" and s["circuit_reason"] == "errors"
                ),
                20,
                f"{stage}'s circuit to open on its errors",
            )
    finally:
        watch.close()
