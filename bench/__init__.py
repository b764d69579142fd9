"""`tidegate bench NAME`: benchmarks on the embedded stack, loopback only, bounded in count and time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {path}")


def run_benchmark(args: argparse.Namespace) -> int:
    if args.name == "latency":
        from bench.latency import run

        write_json(args.json_path, run(args.models.split(","), args.requests or 100, args.broker.split(",")))
        return 0
    if args.name == "overload":
        from bench.overload import run as run_overload

        results = run_overload(
            args.model or "tiny", args.factor, args.duration, args.torch_threads or 1, args.plot, args.broker.split(",")
        )
        write_json(args.json_path, results)
        return 0
    if args.name == "compression":
        from bench.compression import run as run_compression

        write_json(args.json_path, run_compression())
        return 0
    if args.name == "batching":
        from bench.batching import run as run_batching

        results = run_batching(
            args.model or "default",
            args.requests or 48,
            args.baseline_requests,
            args.raw_requests,
            args.max_batch,
            args.batch_tokens,
            args.modes.split(","),
            args.torch_threads or 2,
            args.fetch_wait_ms,
            args.broker.split(","),
        )
        write_json(args.json_path, results)
        return 0
    if args.name == "gateway":
        from bench.gateway import run as run_gateway

        write_json(args.json_path, run_gateway())
        return 0
    if args.name == "scale":
        from bench.scale import run as run_scale

        write_json(args.json_path, run_scale([1, 2, 4, 8]))
        return 0
    if args.name == "rebalance":
        from bench.rebalance import run as run_rebalance

        write_json(args.json_path, run_rebalance(["classic", "consumer"]))
        return 0
    if args.name == "fleet":
        from bench.fleet import run as run_fleet

        write_json(args.json_path, run_fleet())
        return 0
    if args.name == "provider":
        from bench.provider import run as run_provider

        write_json(args.json_path, run_provider())
        return 0
    if args.name == "engines":
        from bench.engines import run as run_engines

        write_json(args.json_path, run_engines(args.requests or 8))
        return 0
    raise AssertionError(args.name)
