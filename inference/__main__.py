"""`python -m inference`: run one inference worker with TIDEGATE_* settings."""

from __future__ import annotations

import logging
import sys

from inference.pools import provider_key, worker_pool
from inference.runners import load_runner
from inference.worker import InferenceWorker
from streams import metrics
from streams.config import Settings
from streams.fleet import FleetError
from streams.lifecycle import stop_on_signals


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:  # TIDEGATE_POOL: its topic, group, engine (in place of MODEL) and max_batch
        settings, pool = worker_pool(Settings())
        key = provider_key(pool)  # engine: openai: read from the variable its api_key_env names
    except FleetError as exc:  # one line per mistake, no traceback: the file is the operator's to fix
        for line in str(exc).splitlines():
            print(f"worker: {line}", file=sys.stderr)
        sys.exit(2)
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    if pool.remote is not None:  # engine: openai: the model is at the provider
        from inference.remote import RemoteRunner
        from inference.remote_worker import RemoteWorker

        worker: InferenceWorker = RemoteWorker(settings, RemoteRunner(pool.remote), pool, key)
    else:
        worker = InferenceWorker(settings, load_runner(settings.model, settings.torch_threads, settings.dtype), pool)
    worker.warm_up()

    stop_on_signals(worker.stopping)
    worker.run()


if __name__ == "__main__":
    main()
