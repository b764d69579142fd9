"""The processors' faust worker keeps the log level it was given."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faust
import pytest

from processors.app import create_app
from processors.faust_tuning import QuietWorker
from streams.config import Settings


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize(("worker_class", "expected"), [(faust.Worker, logging.DEBUG), (QuietWorker, logging.WARNING)])
def test_the_worker_leaves_the_root_logger_at_its_level(root_logging: None, worker_class: type, expected: int) -> None:
    # faust's own worker turns the root logger to DEBUG for its terminal spinner: every
    # aiokafka debug record is then built and dropped; the processors use QuietWorker
    app = create_app(Settings(backpressure=False))
    assert app.conf.Worker is QuietWorker
    # no stdout redirection: mode restores sys.stdout when this worker's context is
    # collected, at some later test's moment, over that test's capsys (test_health
    # read nothing of what it printed when it ran after this module in one process)
    worker = worker_class(app, loglevel="warn", redirect_stdouts=False)
    worker._setup_logging()
    assert logging.getLogger().level == expected
