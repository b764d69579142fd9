"""Fault-injection points: a crash exactly between two steps, on purpose.

A process started with TIDEGATE_FAULTS=name[,name...] kills itself (SIGKILL, no
cleanup, like a power cut) the first time it reaches `fault_point(name)`. The
fault tests (tests/test_faults.py) use them to prove that a crash in a precise
window loses and doubles nothing; in production the variable is unset and a
point costs one set lookup.

`name@N` arms a point for its Nth reach instead of its first; `name@N+` for its Nth
and every reach after it (a fault that lasts: a start failing each time). A point the code
asks with `fault_armed(name)` does not kill: it answers True at that reach (once),
and the code reports a transient fault there itself (an error from a consumer, say),
to prove that the stage survives it.
"""

from __future__ import annotations

import os
import signal

FAULTS_ENV = "TIDEGATE_FAULTS"


def _armed(spec: str) -> dict[str, int]:
    """name -> the reach at which it fires (1: the first)."""
    armed = {}
    for item in filter(None, spec.split(",")):
        name, _, nth = item.partition("@")
        nth = nth.removesuffix("+")
        armed[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return armed


_SPEC = os.environ.get(FAULTS_ENV, "")
_ARMED = _armed(_SPEC)
_LASTING = {item.partition("@")[0] for item in _SPEC.split(",") if item.endswith("+")}  # name@N+
_REACHED: dict[str, int] = {}


def fault_armed(name: str) -> bool:
    """True at the reach of `name` armed in TIDEGATE_FAULTS (once; from it on with
    `name@N+`), else False."""
    if name not in _ARMED:
        return False
    _REACHED[name] = _REACHED.get(name, 0) + 1
    return _REACHED[name] == _ARMED[name] or (name in _LASTING and _REACHED[name] > _ARMED[name])


def fault_point(name: str) -> None:
    """Dies here when `name` is armed in TIDEGATE_FAULTS (at its armed reach)."""
    if fault_armed(name):
        os.kill(os.getpid(), signal.SIGKILL)
