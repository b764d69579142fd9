"""`python -m processors`: run one processor (a faust worker) with TIDEGATE_* settings."""

from __future__ import annotations

import sys

from processors.app import create_app
from streams import metrics
from streams.config import Settings


def main() -> None:
    settings = Settings()
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    app = create_app(settings)
    sys.argv = [sys.argv[0], "worker", "--without-web", "--loglevel=warn"]
    app.main()


if __name__ == "__main__":
    main()
