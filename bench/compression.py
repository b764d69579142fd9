"""`tidegate bench compression`: how fast and how well each strategy compresses.

1. 50 generated conversations of 200 turns (mixed lengths), a fact stated in an
   early turn and asked about in the last one. For budgets 1024 and 2048 and each
   strategy: milliseconds per request (p50/p99; `relevance` with the history's
   embeddings cached, the question embedded per request), tokens kept, and how
   often the fact is still in the context (a kept turn or the summary).
2. The processors' throughput with history lookups: a fresh broker, redis-server
   and one processor, then as many processors (one consumer group) as cores; 200
   sessions with 200-turn histories; requests produced as fast as possible;
   throughput = requests committed by the processors' group per second (measured
   by the lag reader, from first to last commit).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from bench.stats import percentile
from conversation.history import HistoryWriter
from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from processors.compression import STRATEGIES, compress
from processors.embeddings import Embedder
from schemas import AVRO, content_type_header, get_codec
from streams.config import Settings
from streams.kafka import create_topics
from streams.lag import PROCESSORS, LagReader, pipeline_stages
from streams.lifecycle import READY_MARKER
from tidegate import devstack
from tidegate.processes import free_port, stop_pid

CONVERSATIONS = 50
TURNS = 200
BUDGETS = (1024, 2048)
WORDS = [
    "garden",
    "river",
    "window",
    "coffee",
    "budget",
    "engine",
    "planet",
    "market",
    "ticket",
    "summer",
    "winter",
    "music",
    "paper",
    "stone",
    "train",
    "forest",
    "cable",
    "memory",
    "signal",
    "harbor",
    "lantern",
    "orbit",
    "canvas",
    "timber",
    "copper",
    "meadow",
    "voyage",
]
THROUGHPUT_REQUESTS = 20_000
THROUGHPUT_SESSIONS = 200


def _conversation(rng: random.Random, n: int) -> tuple[list[dict[str, str]], str, str]:
    code = f"{rng.randint(1000, 9999)}-{rng.choice(WORDS).upper()}"
    project = rng.choice(WORDS)
    turns = []
    needle_at = rng.randint(1, 10)
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        if i == needle_at:
            content = f"Note this: the access code for the {project} project is {code}."
        else:
            length = rng.choice((6, 12, 25, 60, 150))
            content = " ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + "."
        turns.append({"role": role, "content": content})
    return turns, f"What is the access code for the {project} project?", code


def measure_strategies(seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    counter = TokenCounter(load_counting_tokenizer("default"))
    embedder = Embedder(threads=2)  # the processors use 1; only the prep (history embeddings) runs on 2
    cases = []
    for _ in range(CONVERSATIONS):
        raw, question, code = _conversation(rng, TURNS)
        counts = counter.count_many([t["content"] for t in raw])
        history = [{**t, "tokens": n} for t, n in zip(raw, counts, strict=True)]
        cached = embedder.embed([t["content"] for t in history])  # cached in Redis in the pipeline
        cases.append((history, question, code, cached))
    embedder = Embedder(threads=1)  # per-request work as the processors do it
    embedder.embed(["warm up"])
    results: dict[str, Any] = {}
    for budget in BUDGETS:
        for name in STRATEGIES:
            times, kept_tokens, kept_turns, found = [], [], [], 0
            for history, question, code, cached in cases:
                started = time.perf_counter()
                new = [{"role": "user", "content": question, "tokens": counter.count(question)}]
                similarity = None
                if name == "relevance":
                    similarity = (cached @ embedder.embed([question])[0]).tolist()
                ctx = compress(name, history, new, budget, counter, similarity)
                times.append((time.perf_counter() - started) * 1000)
                kept_tokens.append(ctx.tokens_used)
                kept_turns.append(len(ctx.turns) - 1)
                found += any(code in t["content"] for t in ctx.turns) or bool(ctx.summary and code in ctx.summary)
            results[f"{name}@{budget}"] = {
                "p50_ms": round(percentile(times, 50), 3),
                "p99_ms": round(percentile(times, 99), 3),
                "mean_tokens_kept": round(float(np.mean(kept_tokens)), 1),
                "mean_turns_kept": round(float(np.mean(kept_turns)), 1),
                "needle_kept": round(found / len(cases), 3),
            }
            r = results[f"{name}@{budget}"]
            print(
                f"{name:>14} budget {budget}: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                f"tokens {r['mean_tokens_kept']:.0f}  turns {r['mean_turns_kept']:.0f}  needle {r['needle_kept']:.0%}"
            )
    return results


def measure_processor_throughput(processors: int = 1, broker: devstack.Broker = "kafka") -> dict[str, Any]:
    """Requests/s through `processors` real processors (faust, one consumer group)
    with 200-turn histories in Redis."""
    import redis

    log_dir = Path(".tidegate/bench-logs/compression")
    rport = free_port()
    pids: list[int] = []
    brokers = devstack.start_brokers(broker, 1, log_dir / "kafka", log_dir)
    try:
        pids.append(devstack.start_redis(rport, log_dir).pid)
        settings = Settings(bootstrap=brokers.bootstrap, redis_url=f"redis://127.0.0.1:{rport}/0", broker=broker)
        create_topics(settings)
        counter = TokenCounter(load_counting_tokenizer("default"))
        rng = random.Random(3)
        writer = HistoryWriter(settings.history_ttl_s, settings.history_max_turns)
        client = redis.Redis.from_url(settings.redis_url)
        with client.pipeline(transaction=False) as pipe:
            for s in range(THROUGHPUT_SESSIONS):
                raw, _, _ = _conversation(rng, TURNS)
                counts = counter.count_many([t["content"] for t in raw])
                writer.append(pipe, "bench", f"s{s}", [{**t, "tokens": n} for t, n in zip(raw, counts, strict=True)])
            pipe.execute()
        env = {
            "TIDEGATE_BOOTSTRAP": settings.bootstrap,
            "TIDEGATE_REDIS_URL": settings.redis_url,
            "TIDEGATE_BROKER": broker,
            "TIDEGATE_MODEL": "echo",
            "TIDEGATE_BACKPRESSURE": "false",
        }
        for n in range(processors):
            proc = devstack.start_stage("processors", env, log_dir / f"p{n}")
            pids.append(proc.pid)
            devstack.wait_for_ready(log_dir / f"p{n}" / "processors.log", READY_MARKER, proc, 120)
        codec = get_codec()
        producer = Producer({"bootstrap.servers": settings.bootstrap, "linger.ms": 5})
        for i in range(THROUGHPUT_REQUESTS):
            session = f"s{i % THROUGHPUT_SESSIONS}"
            request = {
                "request_id": uuid.uuid4().hex,
                "session_id": session,
                "tenant": "bench",
                "messages": [{"role": "user", "content": f"Question {i}: what about the {rng.choice(WORDS)}?"}],
                "priority": "normal",
                "max_new_tokens": 16,
                "temperature": 0.0,
                "created_ms": 0,
                "deadline_ms": 0,
                "reply_to": settings.topics.replies,
                "strategy": "window",
                "metadata": {},
            }
            producer.produce(
                settings.topics.requests,
                codec.encode("InferenceRequest", request),
                session.encode(),
                headers=[content_type_header(AVRO)],
            )
            if i % 1000 == 0:
                producer.poll(0)
        producer.flush(30)
        stage = next(s for s in pipeline_stages(settings) if s.name == PROCESSORS)
        reader = LagReader(settings, [stage])
        first_at = last_at = None
        deadline = time.monotonic() + 300
        done = 0
        while time.monotonic() < deadline:
            reader.poll(0.05)
            done = reader.lag(stage).committed
            now = time.monotonic()
            if done > 0 and first_at is None:
                first_at, first_done = now, done
            if done >= THROUGHPUT_REQUESTS:
                last_at = now
                break
        reader.close()
        if first_at is None or last_at is None:
            raise RuntimeError(f"the processor committed {done} of {THROUGHPUT_REQUESTS} requests in time")
        rate = (done - first_done) / max(1e-6, last_at - first_at)
        print(
            f"{processors} processor(s): {THROUGHPUT_REQUESTS} requests with 200-turn histories "
            f"at {rate:.0f} requests/s"
        )
        return {
            "processors": processors,
            "requests": THROUGHPUT_REQUESTS,
            "history_turns": TURNS,
            "requests_per_s": round(rate, 1),
        }
    finally:
        for pid in reversed(pids):
            stop_pid(pid)
        brokers.stop()


def run() -> dict[str, Any]:
    return {
        "benchmark": "compression",
        "conversations": CONVERSATIONS,
        "turns": TURNS,
        "strategies": measure_strategies(),
        # one processor, then the group scaled to one per core
        "processor_throughput": [measure_processor_throughput(n) for n in (1, os.cpu_count() or 1)],
    }
