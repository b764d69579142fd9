"""The deployment files agree with what the tests run: docker-compose mounts the
broker settings the dev stack and the tests use, and every service restarts."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
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


def k8s(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if doc]


def test_keda_scales_the_workers_on_a_lag_threshold_derived_from_the_cap() -> None:
    config = k8s("config.yaml")[0]["data"]
    deployments = {d["metadata"]["name"]: d for d in k8s("stages.yaml")}
    scaled = k8s("keda.yaml")[0]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in deployments
    assert spec["maxReplicaCount"] == int(config["TIDEGATE_CONTEXT_PARTITIONS"])
    kafka = next(t["metadata"] for t in spec["triggers"] if t["type"] == "kafka")
    cap, warn = int(config["TIDEGATE_WORKERS_CAP_MESSAGES"]), float(config["TIDEGATE_WARN_RATIO"])
    assert int(kafka["lagThreshold"]) == math.ceil(warn * cap / spec["maxReplicaCount"])
    assert kafka["consumerGroup"] == config["TIDEGATE_WORKER_GROUP"]
    assert kafka["bootstrapServers"] == config["TIDEGATE_BOOTSTRAP"]
    assert kafka["topic"] == "tidegate.contexts"
    prometheus = next(t["metadata"] for t in spec["triggers"] if t["type"] == "prometheus")
    assert 'tidegate_lag_seconds{stage="workers"}' in prometheus["query"]
    for deployment in deployments.values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] in {"monitor", "processor", "worker"}
        assert container["envFrom"] == [{"configMapRef": {"name": "tidegate"}}]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (make setup installs it)")
def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    folder = ROOT / "deploy" / "prometheus"
    checked = subprocess.run(["promtool", "check", "rules", "rules.yml"], cwd=folder, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "rules_test.yml"], cwd=folder, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_dashboard_and_the_rules_query_metrics_the_processes_export() -> None:
    """Every tidegate_ name in the Grafana dashboard and the alert rules is one that
    streams/metrics.py defines (or a rule records): no panel stays empty."""
    import json
    import re

    from prometheus_client import REGISTRY

    import streams.metrics  # noqa: F401  (registers every metric)

    exported = set()
    for family in REGISTRY.collect():
        if family.name.startswith("tidegate_"):
            exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
    rules = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    exported |= set(re.findall(r"record: (tidegate_\w+)", rules))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tidegate.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    named = set(re.findall(r"tidegate_\w+", " ".join(queries) + rules))
    assert named and named <= exported, named - exported
    services = compose()["services"]
    assert {"prometheus", "grafana"} <= set(services)
