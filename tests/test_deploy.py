"""The deployment files agree with what the tests run: docker-compose mounts the
broker settings the dev stack and the tests use, and every service restarts."""

from __future__ import annotations

from pathlib import Path

import yaml

from tidegate.kafka_broker import SHARED_PROPERTIES, shared_properties

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_kafka_uses_the_shared_broker_settings() -> None:
    kafka = compose()["services"]["kafka"]
    mounts = [v.split(":") for v in kafka["volumes"]]
    assert any(
        Path(ROOT, src).resolve() == SHARED_PROPERTIES and dst.endswith("server.properties") for src, dst, *_ in mounts
    )
    # the environment adds only this node's own settings, never a shared one twice
    env_keys = {k.removeprefix("KAFKA_").lower().replace("_", ".") for k in kafka["environment"]}
    assert not env_keys & set(shared_properties())
    assert shared_properties()["auto.create.topics.enable"] == "false"
    assert kafka["healthcheck"]["test"] and "19092:19092" in kafka["ports"]


def test_every_compose_service_but_the_topic_job_restarts() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if name != "topics":
            assert service.get("restart") == "unless-stopped", name
