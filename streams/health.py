"""Liveness and readiness of a stage, served beside its metrics on METRICS_PORT.

    GET /healthz   200 while the process serves (a liveness probe)
    GET /readyz    200 once the stage announced it is ready (it joined its group and
                   holds what it needs: streams/lifecycle.py), 503 before
    GET /metrics   Prometheus text (any other path too, as prometheus_client does)

The same paths as the gateway's (gateway/app.py), so one probe shape fits every
stage: Kubernetes' httpGet probes and compose's `tidegate probe` use them. The
readiness flag is the one `announce_ready` sets when it prints READY_MARKER, the
line the dev stack and the tests wait for: what the supervisor calls ready is what
a probe calls ready.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

LIVE_PATH = "/healthz"
READY_PATH = "/readyz"

_ready = threading.Event()


def mark_ready() -> None:
    _ready.set()


def is_ready() -> bool:
    return _ready.is_set()


def health_app(metrics_app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """A WSGI app answering the two probe paths and handing the rest to `metrics_app`."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == LIVE_PATH:
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status": "ok"}']
        if path == READY_PATH:
            if is_ready():
                start_response("200 OK", [("Content-Type", "application/json")])
                return [b'{"status": "ready"}']
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [b'{"status": "starting"}']
        return metrics_app(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_server(port: int, host: str) -> WSGIServer:
    """Serves the health paths and the default registry on `host:port` (0: a free
    port) from a daemon thread, as prometheus_client's start_http_server does."""

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    server = make_server(host, port, health_app(make_wsgi_app(REGISTRY)), Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-and-health", daemon=True).start()
    return server
