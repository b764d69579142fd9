"""`python -m inference`: run one inference worker with TIDEGATE_* settings."""

from __future__ import annotations

import logging

from inference.runners import load_runner
from inference.worker import InferenceWorker
from streams import metrics
from streams.config import Settings
from streams.lifecycle import stop_on_signals


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    runner = load_runner(settings.model, settings.torch_threads, settings.dtype)
    worker = InferenceWorker(settings, runner)
    worker.warm_up()

    stop_on_signals(worker.stopping)
    worker.run()


if __name__ == "__main__":
    main()
