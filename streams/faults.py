"""Fault-injection points: a crash exactly between two steps, on purpose.

A process started with TIDEGATE_FAULTS=name[,name...] kills itself (SIGKILL, no
cleanup, like a power cut) the first time it reaches `fault_point(name)`. The
fault tests (tests/test_faults.py) use them to prove that a crash in a precise
window loses and doubles nothing; in production the variable is unset and a
point costs one set lookup.
"""

from __future__ import annotations

import os
import signal

FAULTS_ENV = "TIDEGATE_FAULTS"
_ARMED = frozenset(filter(None, os.environ.get(FAULTS_ENV, "").split(",")))


def fault_point(name: str) -> None:
    """Dies here when `name` is armed in TIDEGATE_FAULTS."""
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
