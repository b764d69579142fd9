"""`tidegate bench batching`: how much the workers' batching gains over one at a time.

One run, one model, one set of requests (prompts of 50-500 tokens behind a shared
system prompt, max_new_tokens 8-128, greedy, seeded):

1. baseline: plain `model.generate` one request at a time (batch size 1), in-process,
   on stock transformers; then the same on the model as the workers load it
   (inference/attention.py, inference/packed_linear.py), so that the gain of
   batching alone can be told from the gain of the worker's kernels;
2. raw batched `generate`: the worker's model on batches of `max_batch`, in-process;
3. the pipeline at saturation, per mode: a fresh embedded stack (broker, Redis,
   processor, one worker), every request submitted at once, throughput from the
   first send to the last reply. Mean batch size and padding share come from the
   worker's counters (inference/engine.py EngineStats, published to Redis).

Tokens/s counts generated tokens. Ratios are against the baseline and the raw
batched figure of this same run.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from pathlib import Path
from typing import Any

import redis

from bench.stats import percentile
from inference.batcher import select_batch
from inference.engine import EngineStats, Request
from inference.runners import Prompt, chat_ids, load_runner
from inference.session_store import STATS_KEY
from streams.client import Client
from streams.config import Settings
from tidegate import devstack, processes

SYSTEM_PROMPT = (
    "You are the support assistant of Tideway Outfitters, a shop for sailing and kayaking gear. "
    "Answer briefly and politely, in plain English, and never invent order numbers or prices."
)
WORDS = [
    "boat",
    "tide",
    "harbour",
    "wind",
    "sail",
    "rope",
    "anchor",
    "kayak",
    "paddle",
    "current",
    "wave",
    "buoy",
    "chart",
    "compass",
    "jacket",
    "order",
    "delivery",
    "refund",
    "size",
    "colour",
    "weather",
    "storm",
    "island",
    "coast",
    "lighthouse",
    "river",
    "estuary",
    "gear",
]
PROMPT_TOKENS = (50, 500)
NEW_TOKENS = (8, 128)
TIME_LIMIT_S = 900.0  # per pipeline mode


def workload(tokenizer: Any, count: int, seed: int = 7) -> list[Prompt]:
    """`count` prompts whose chat-templated length is uniform in PROMPT_TOKENS."""
    rng = random.Random(seed)
    system = {"role": "system", "content": SYSTEM_PROMPT}
    base = len(chat_ids(tokenizer, [system, {"role": "user", "content": ""}], generation_prompt=True))
    prompts = []
    for i in range(count):
        target = rng.randint(*PROMPT_TOKENS) - base
        words = " ".join(rng.choice(WORDS) for _ in range(target * 2))
        ids = tokenizer(f"Question {i}: {words}", add_special_tokens=False)["input_ids"][: max(1, target)]
        prompts.append(Prompt([system, {"role": "user", "content": tokenizer.decode(ids)}], rng.randint(*NEW_TOKENS)))
    return prompts


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 2) if seconds > 0 else 0.0


def _one_at_a_time(runner: Any, prompts: list[Prompt]) -> dict[str, Any]:
    started, tokens = time.monotonic(), 0
    for p in prompts:
        tokens += runner.generate([p])[0].tokens_out
    return {"requests": len(prompts), "tokens": tokens, "tokens_per_s": _rate(tokens, time.monotonic() - started)}


def _stock_baseline(model: str, prompts: list[Prompt], threads: int) -> dict[str, Any]:
    stock = load_runner(model, threads, optimized=False)
    stock.generate([prompts[0]])  # warm-up
    return _one_at_a_time(stock, prompts)


def _on_worker_model(
    model: str, prompts: list[Prompt], baseline_prompts: list[Prompt], raw_prompts: list[Prompt], settings: Settings
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """On the model as the workers load it: one at a time, raw batched `generate`, and
    the engine alone on every request."""
    batch = settings.max_batch
    runner = load_runner(model, settings.torch_threads)
    runner.generate([baseline_prompts[0]])  # warm-up
    one_by_one = _one_at_a_time(runner, baseline_prompts)
    started, tokens = time.monotonic(), 0
    for i in range(0, len(raw_prompts), batch):
        tokens += sum(g.tokens_out for g in runner.generate(raw_prompts[i : i + batch]))
    raw = {
        "requests": len(raw_prompts),
        "batch": batch,
        "tokens": tokens,
        "tokens_per_s": _rate(tokens, time.monotonic() - started),
    }
    return one_by_one, raw, _engine_alone(runner, prompts, settings)


def _engine_alone(runner: Any, prompts: list[Prompt], settings: Settings) -> dict[str, Any]:
    """The worker's engine and batch selection (`select_batch`, `join_room`) with
    every request already pooled, in-process: the pipeline without Kafka, Redis, the
    processor and the other processes on the machine."""
    pending = []
    for i, p in enumerate(prompts):
        ids, prefix_len = runner.encode(p)
        pending.append(Request(i, ids, p.max_new_tokens, p.temperature, prefix_len))
    engine = runner.engine(settings.prefix_cache_entries)
    started, tokens = time.monotonic(), 0
    while pending or engine.busy:
        room = settings.join_room(len(engine.active), engine.busy)
        if pending and room:
            joining, pending = select_batch(pending, lambda r: len(r.ids), room, settings.batch_tokens)
            tokens += sum(len(r.out) for r in engine.add(joining))
        if engine.busy:
            tokens += sum(len(r.out) for r in engine.step())
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "tokens_per_s": _rate(tokens, time.monotonic() - started),
        "mean_batch": round(engine.stats.mean_batch(), 2),
    }


def _free_memory() -> None:
    """After a runner went out of scope: its model is freed before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_in_process(
    model: str, prompts: list[Prompt], baseline_count: int, raw_count: int, settings: Settings
) -> dict[str, Any]:
    """The plain baseline on stock transformers; then, on the model as the workers load
    it (grouped decode attention, packed CPU weights), the same one at a time (what
    batching alone gains), raw batched `generate`, and the engine alone (what the
    pipeline around it costs)."""
    out: dict[str, Any] = {"baseline": _stock_baseline(model, prompts[:baseline_count], settings.torch_threads)}
    print(f"baseline (batch 1)      {out['baseline']['tokens_per_s']:8.1f} tok/s  ({baseline_count} requests, stock)")
    _free_memory()
    out["baseline_worker_kernels"], out["raw_batched"], out["engine_alone"] = _on_worker_model(
        model, prompts, prompts[:baseline_count], prompts[:raw_count], settings
    )
    batch = settings.max_batch
    print(f"baseline, worker's model {out['baseline_worker_kernels']['tokens_per_s']:7.1f} tok/s")
    print(f"raw generate (batch {batch:3d}) {out['raw_batched']['tokens_per_s']:8.1f} tok/s  ({raw_count} requests)")
    print(f"engine alone, in-process {out['engine_alone']['tokens_per_s']:7.1f} tok/s  ({len(prompts)} requests)")
    _free_memory()
    return out


async def _saturate(settings: Settings, prompts: list[Prompt], tag: str) -> tuple[list[dict[str, Any]], float]:
    async with Client(settings=settings) as client:
        started = time.monotonic()

        async def one(i: int, p: Prompt) -> dict[str, Any]:
            reply = await client.generate(
                p.messages, f"{tag}-{i}", max_new_tokens=p.max_new_tokens, deadline_s=TIME_LIMIT_S
            )
            return {**reply.to_record(), "latency_s": time.monotonic() - started}

        replies = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return list(replies), time.monotonic() - started


def _worker_stats(redis_url: str, after_ms: int) -> EngineStats:
    """The worker's counters, once it published them after the last reply."""
    client = redis.Redis.from_url(redis_url)
    fields = [f for f in EngineStats.__dataclass_fields__]

    def read() -> list[dict[bytes, bytes]]:
        return [client.hgetall(k) for k in client.scan_iter(f"{STATS_KEY}*")]

    processes.wait_until(lambda: any(int(h.get(b"updated_ms", 0)) > after_ms for h in read()), 10, "worker stats")
    total = EngineStats()
    for h in read():
        for f in fields:
            setattr(total, f, getattr(total, f) + int(h.get(f.encode(), 0)))
    client.close()
    return total


def measure_pipeline(
    model: str,
    prompts: list[Prompt],
    mode: str,
    batch: int,
    batch_tokens: int,
    threads: int,
    fetch_wait_ms: int | None,
    broker: devstack.Broker = "kafka",
) -> dict[str, Any]:
    """One pipeline run on a fresh stack of `broker`; `fetch_wait_ms` is FETCH_WAIT_MS
    for the stack and this benchmark's own reply consumer (None: the broker's default)."""
    batching, _, variant = mode.partition("-")
    fetch_wait_ms = fetch_wait_ms or Settings(broker=broker).fetch_wait_ms
    env = {
        "TIDEGATE_FETCH_WAIT_MS": str(fetch_wait_ms),
        "TIDEGATE_BATCHING": batching,
        "TIDEGATE_MAX_BATCH": str(batch),
        "TIDEGATE_BATCH_TOKENS": str(batch_tokens),
        "TIDEGATE_PREFETCH_LIMIT": str(max(64, 4 * batch)),
        "TIDEGATE_TORCH_THREADS": str(threads),
        "TIDEGATE_PREFIX_CACHE_ENTRIES": "0" if variant == "noprefix" else "8",
        "TIDEGATE_RESPONSE_CACHE_TTL_S": "0",
        "TIDEGATE_BACKPRESSURE": "false",  # saturation on purpose: no queue_full
        "TIDEGATE_MAX_NEW_TOKENS_LIMIT": str(NEW_TOKENS[1]),
    }
    print(f"== pipeline, {broker}, {mode}, FETCH_WAIT_MS={fetch_wait_ms}: starting a fresh stack")
    log_dir = Path(".tidegate/bench-logs") / f"batching-{broker}-{mode}-fetch{fetch_wait_ms}"
    stack = devstack.up(model=model, log_dir=log_dir, extra_env=env, broker=broker)
    try:
        settings = Settings(
            bootstrap=stack.bootstrap, redis_url=stack.redis_url, fetch_wait_ms=fetch_wait_ms, broker=broker
        )
        replies, elapsed = asyncio.run(_saturate(settings, prompts, f"batching-{mode}"))
        bad = [r for r in replies if r["status"] != "ok"]
        if bad:
            raise RuntimeError(f"{len(bad)} requests failed: {bad[0]['status']} {bad[0]['error']}")
        stats = _worker_stats(stack.redis_url, max(r["replied_ms"] for r in replies))
    finally:
        stack.stop()
    tokens = sum(r["tokens_out"] for r in replies)
    latencies = [r["latency_s"] for r in replies]
    result = {
        "broker": broker,
        "fetch_wait_ms": fetch_wait_ms,
        "requests": len(replies),
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": _rate(tokens, elapsed),
        "latency_p50_s": round(percentile(latencies, 50), 2),
        "latency_p99_s": round(percentile(latencies, 99), 2),
        "mean_batch": round(stats.mean_batch(), 2),
        "padding_share": round(stats.padding_share(), 4),
        "kv_padding_share": round(stats.kv_padding_share(), 4),
        "prefix_reused_tokens": stats.prefix_reused,
    }
    print(
        f"pipeline {mode:20s} {result['tokens_per_s']:8.1f} tok/s  p50 {result['latency_p50_s']:.1f} s"
        f"  p99 {result['latency_p99_s']:.1f} s  mean batch {result['mean_batch']:.1f}"
        f"  padding {result['padding_share']:.1%}  kv padding {result['kv_padding_share']:.1%}"
    )
    return result


def run(
    model: str,
    requests: int,
    baseline_requests: int,
    raw_requests: int,
    batch: int,
    batch_tokens: int,
    modes: list[str],
    threads: int,
    fetch_waits_ms: list[int] | None = None,
    brokers: list[devstack.Broker] | None = None,
) -> dict[str, Any]:
    from conversation.model_files import load_tokenizer

    prompts = workload(load_tokenizer(model), requests)
    device = _device_name()
    print(f"model {model} on {device}; {requests} requests, prompts {PROMPT_TOKENS}, new tokens {NEW_TOKENS}")
    results: dict[str, Any] = {
        "benchmark": "batching",
        "model": model,
        "device": device,
        "max_batch": batch,
        "batch_tokens": batch_tokens,
        **measure_in_process(
            model,
            prompts,
            min(baseline_requests, requests),
            min(raw_requests, requests),
            Settings(max_batch=batch, batch_tokens=batch_tokens, torch_threads=threads),
        ),
        "pipeline": {},
    }
    for broker in brokers or ["kafka"]:
        for wait in fetch_waits_ms or [None]:
            for mode in modes:
                name = f"{broker} {mode}" + (f", fetch wait {wait} ms" if wait else "")
                results["pipeline"][name] = measure_pipeline(
                    model, prompts, mode, batch, batch_tokens, threads, wait, broker
                )
    base, raw = results["baseline"]["tokens_per_s"], results["raw_batched"]["tokens_per_s"]
    same = results["baseline_worker_kernels"]["tokens_per_s"]
    alone = results["engine_alone"]["tokens_per_s"]
    for mode, r in results["pipeline"].items():
        r["x_baseline"] = round(r["tokens_per_s"] / base, 2) if base else None
        r["x_baseline_worker_kernels"] = round(r["tokens_per_s"] / same, 2) if same else None
        r["of_raw_batched"] = round(r["tokens_per_s"] / raw, 3) if raw else None
        r["of_engine_alone"] = round(r["tokens_per_s"] / alone, 3) if alone else None
        print(
            f"{mode:36s} {r['x_baseline']:.2f}x the one-at-a-time baseline "
            f"({r['x_baseline_worker_kernels']:.2f}x on the worker's model), {r['of_raw_batched']:.0%} of raw "
            f"batched, {r['of_engine_alone']:.0%} of the engine alone"
        )
    return results


def _device_name() -> str:
    import torch

    from inference.runners import pick_device

    device, dtype = pick_device()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return f"{name} ({str(dtype).removeprefix('torch.')})"
