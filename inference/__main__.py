"""`python -m inference`: run one inference worker with TIDEGATE_* settings."""

from __future__ import annotations

import logging
import signal

from inference.models import load_runner
from inference.worker import InferenceWorker
from streams.config import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    runner = load_runner(settings.model, settings.torch_threads, settings.dtype)
    worker = InferenceWorker(settings, runner)
    worker.warm_up()

    def stop(signum: int, _frame: object) -> None:
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


if __name__ == "__main__":
    main()
