"""`tidegate probe ready|live`: a stage's health as an exit code, for compose's
healthcheck and Kubernetes exec probes where an HTTP probe cannot be used.

It asks the stage's own endpoint (streams/health.py, the gateway's alike) on
loopback: /readyz or /healthz, 0 on a 200, 1 otherwise, one line saying why.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from streams.exceptions import TidegateError
from streams.health import LIVE_PATH, READY_PATH

PATHS = {"ready": READY_PATH, "live": LIVE_PATH}


def probe(what: str, port: int | None, timeout_s: float = 2.0) -> int:
    if port is None:
        raise TidegateError("no port to probe: set TIDEGATE_METRICS_PORT (the stage serves its probes there) or --port")
    url = f"http://127.0.0.1:{port}{PATHS[what]}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0
