"""Each stage's probes on its metrics port (streams/health.py): /readyz answers 503
until the stage announces it is ready (the same moment it prints READY_MARKER),
then 200; /healthz answers 200 throughout; the metrics stay where they were; and
`tidegate probe` turns that into an exit code."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from streams import health, lifecycle, metrics
from tidegate.cli import main


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "_ready", threading.Event())


def test_readyz_turns_200_when_the_stage_announces_ready_and_healthz_is_200_throughout(
    not_ready: None, capsys: pytest.CaptureFixture[str]
) -> None:
    port = metrics.serve_metrics(0)
    assert port is not None
    assert status(port, "/healthz") == 200
    assert status(port, "/readyz") == 503
    assert main(["probe", "ready", "--port", str(port)]) == 1
    assert main(["probe", "live", "--port", str(port)]) == 0
    lifecycle.announce_ready()
    assert lifecycle.READY_MARKER in capsys.readouterr().out
    assert status(port, "/readyz") == 200
    assert main(["probe", "ready", "--port", str(port)]) == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"tidegate_" in response.read()


def test_a_probe_of_a_port_nobody_serves_fails_with_a_line_saying_why(capsys: pytest.CaptureFixture[str]) -> None:
    from tidegate.processes import free_port

    assert main(["probe", "live", "--port", str(free_port())]) == 1
    assert "refused" in capsys.readouterr().err.lower()
