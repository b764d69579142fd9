"""How a stage process tells its supervisor it is ready, and how it is asked to stop.

Every stage (processor, worker, lag monitor) prints `READY_MARKER` once it has
joined its group; the dev stack and the test fixtures wait for that line in the
stage's log, and its /readyz (streams/health.py) answers 200 from then on. SIGTERM
and SIGINT set a `threading.Event` the stage's loop checks, so it finishes what it
holds and exits on its own.
"""

from __future__ import annotations

import signal
import threading

from streams import health

READY_MARKER = "tidegate-ready"


def announce_ready() -> None:
    health.mark_ready()  # /readyz answers 200 from now on (streams/health.py)
    print(READY_MARKER, flush=True)


def stop_on_signals(stopping: threading.Event) -> None:
    """SIGTERM and SIGINT set `stopping`: a stage finishes its batch, then exits."""

    def stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
