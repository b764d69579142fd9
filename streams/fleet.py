"""The fleet: which models a deployment serves, and the pools of workers that serve them.

A fleet file (FLEET_FILE, YAML) names the models (public ids, aliases, each one's
context budget and default fallback chain) and the pools (each one's engine, the
models it serves, partitions, caps and weight):

    models:
      smol: {aliases: [gpt-4o-mini], token_budget: 1024, fallbacks: [tiny]}
      tiny: {token_budget: 512}
    pools:
      fast:  {engine: "sim:5", models: [smol], partitions: 8, weight: 2}
      spare: {engine: echo, models: [smol, tiny], workers_cap_messages: 200}

Each pool has its own contexts topic (`<prefix>contexts.<pool>`), worker group
(`<WORKER_GROUP>.<pool>`) and pressure stage (`workers.<pool>`); a pool named
`default` keeps today's names (`<prefix>contexts`, WORKER_GROUP, `workers`). Without
a fleet file the fleet is one pool, `default`, serving MODEL with TOKEN_BUDGET:
every topic and group keeps its name, and nothing changes for today's users.

The file is checked whole at start: every mistake is one line of `FleetError`,
all of them at once, so an operator fixes the file in one go.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streams.config import Settings
from streams.exceptions import TidegateError
from streams.fleet_remote import OPENAI_ENGINE, REMOTE_KEYS, RemoteSpec, parse_remote

DEFAULT_POOL = "default"
WORKERS_STAGE = "workers"
POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# public model ids as callers write them (`gpt-4o-mini`, `org/model:tag`)
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")
MODEL_NAME_RULE = "a model id is 1-128 letters, digits or ._:/@-"
POOL_NAME_RULE = "a pool name is 1-32 lowercase letters, digits, '_' or '-'"
MAX_POOLS = 32
MAX_MODELS = 64
MAX_FALLBACKS = 8  # a request's own list and a model's default chain alike

POOL_KEYS = {
    "engine",
    "models",
    "partitions",
    "weight",
    "workers_cap_messages",
    "workers_cap_seconds",
    "max_batch",
    "replicas",
    *REMOTE_KEYS,  # engine: openai (streams/fleet_remote.py)
}
MODEL_KEYS = {"aliases", "token_budget", "fallbacks"}


class FleetError(TidegateError):
    """The fleet file is unreadable or wrong; one line per mistake."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model callers can ask for: its public id, other names for it, the context
    budget its envelopes are compressed to, and the models tried after it."""

    id: str
    token_budget: int
    aliases: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pool:
    """Workers of one engine serving some models, behind a contexts topic of their own."""

    name: str
    engine: str
    models: tuple[str, ...]
    contexts_topic: str
    group: str
    stage: str  # its key on the pressure topic
    partitions: int
    weight: float = 1.0
    workers_cap_messages: int | None = None
    workers_cap_seconds: float = 4.0
    max_batch: int | None = None  # None: MAX_BATCH
    replicas: int = 1  # workers `dev up --fleet` starts
    remote: RemoteSpec | None = None  # engine: openai, its provider (streams/fleet_remote.py)


@dataclass(frozen=True, slots=True)
class Fleet:
    models: dict[str, ModelSpec]
    pools: dict[str, Pool]
    _names: dict[str, str] = field(default_factory=dict)  # id or alias -> id

    def __post_init__(self) -> None:
        for spec in self.models.values():
            self._names[spec.id] = spec.id
            for alias in spec.aliases:
                self._names[alias] = spec.id

    @property
    def single(self) -> bool:
        """One pool, `default`, as without a fleet file."""
        return list(self.pools) == [DEFAULT_POOL]

    def resolve(self, name: str) -> ModelSpec | None:
        """The model an id or alias names, or None."""
        model_id = self._names.get(name)
        return self.models[model_id] if model_id is not None else None

    def names(self) -> list[str]:
        """Every id and alias callers may use, ids first."""
        return list(self.models) + [n for n in self._names if n not in self.models]

    def pools_of(self, model_id: str) -> list[Pool]:
        """The pools serving `model_id`, in the file's order."""
        return [pool for pool in self.pools.values() if model_id in pool.models]

    def pool_of_stage(self, stage: str) -> Pool | None:
        return next((pool for pool in self.pools.values() if pool.stage == stage), None)

    def candidates(self, model: str, fallbacks: list[str] | tuple[str, ...] = ()) -> list[ModelSpec]:
        """The models to try for a request, in order: the one it names (its default
        when it names none), then its own `fallbacks`, or where it gives none the
        model's default chain; unknown names and repeats are left out (a request's
        unknown `model` is refused before this: `unknown_model`)."""
        first = self.resolve(model) if model else self.default_model
        if first is None:
            return []
        chain = list(fallbacks) if fallbacks else list(first.fallbacks)
        out: list[ModelSpec] = [first]
        for name in chain[:MAX_FALLBACKS]:
            spec = self.resolve(name)
            if spec is not None and spec not in out:
                out.append(spec)
        return out

    @property
    def default_model(self) -> ModelSpec:
        """The model of a request that names none: the file's first."""
        return next(iter(self.models.values()))


def pool_names(settings: Settings, name: str) -> tuple[str, str, str]:
    """(contexts topic, worker group, pressure stage) of the pool `name`: `default`
    keeps the names a deployment without a fleet file has."""
    if name == DEFAULT_POOL:
        return settings.topics.contexts, settings.worker_group, WORKERS_STAGE
    return f"{settings.topics.contexts}.{name}", f"{settings.worker_group}.{name}", f"{WORKERS_STAGE}.{name}"


def default_fleet(settings: Settings) -> Fleet:
    """The fleet of a deployment without a fleet file: MODEL in one pool, `default`."""
    topic, group, stage = pool_names(settings, DEFAULT_POOL)
    model = ModelSpec(settings.model, settings.token_budget)
    pool = Pool(
        DEFAULT_POOL,
        settings.model,
        (settings.model,),
        topic,
        group,
        stage,
        settings.context_partitions,
        workers_cap_messages=settings.workers_cap_messages,
        workers_cap_seconds=settings.workers_cap_seconds,
    )
    return Fleet({model.id: model}, {DEFAULT_POOL: pool})


def fleet_from_states(states: Iterable[Mapping[str, Any]]) -> Fleet | None:
    """The fleet as the pools' PressureStates carry it (their `pool` and `models`): how a
    client or gateway without the fleet file learns it, through Kafka. None while no
    state names a pool (no monitor has published yet, or it predates fleets)."""
    models: dict[str, ModelSpec] = {}
    pools: dict[str, Pool] = {}
    for state in states:
        name = state.get("pool") or ""
        if not name or not state.get("models"):
            continue
        for entry in state["models"]:
            models.setdefault(
                entry["id"],
                ModelSpec(
                    entry["id"],
                    entry.get("token_budget") or 0,
                    tuple(entry.get("aliases") or ()),
                    tuple(entry.get("fallbacks") or ()),
                ),
            )
        pools[name] = Pool(
            name,
            "",
            tuple(entry["id"] for entry in state["models"]),
            "",
            "",
            state["stage"],
            state.get("partitions") or 0,
            state.get("weight") or 1.0,
        )
    return Fleet(models, pools) if pools else None


def load_fleet(settings: Settings) -> Fleet:
    """The fleet FLEET_FILE describes, or the default one without it.

    :raises FleetError: naming every mistake in the file, one per line."""
    if not settings.fleet_file:
        return default_fleet(settings)
    path = Path(settings.fleet_file)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FleetError(f"fleet file {path}: cannot read it: {exc}".splitlines()[0]) from exc
    return parse_fleet(raw, settings, str(path))


def parse_fleet(raw: Any, settings: Settings, source: str = "fleet file") -> Fleet:
    """A fleet from the file's parsed YAML; every mistake is a line of the FleetError."""
    mistakes: list[str] = []
    if not isinstance(raw, dict) or set(raw) - {"models", "pools"}:
        raise FleetError(f"{source}: expected a mapping with `models` and `pools`")
    models = _parse_models(raw.get("models"), settings, mistakes)
    pools = _parse_pools(raw.get("pools"), settings, models, mistakes)
    for spec in models.values():
        for name in spec.fallbacks:
            if name not in models and not any(name in m.aliases for m in models.values()):
                mistakes.append(f"models.{spec.id}.fallbacks: {name!r} is not a model of the fleet")
        if pools and not any(spec.id in pool.models for pool in pools.values()):
            mistakes.append(f"models.{spec.id}: no pool serves it")
    if mistakes:
        raise FleetError("\n".join(f"{source}: {m}" for m in mistakes))
    return Fleet(models, pools)


def _parse_models(raw: Any, settings: Settings, mistakes: list[str]) -> dict[str, ModelSpec]:
    if not isinstance(raw, dict) or not raw:
        mistakes.append("models: expected a mapping of model id -> its settings, at least one")
        return {}
    if len(raw) > MAX_MODELS:
        mistakes.append(f"models: {len(raw)} models, at most {MAX_MODELS}")
    models: dict[str, ModelSpec] = {}
    names: set[str] = set()
    for model_id, body, where in _entries(raw, "models", MODEL_ID, MODEL_KEYS, MODEL_NAME_RULE, mistakes):
        aliases = _names_list(body.get("aliases", []), f"{where}.aliases", mistakes)
        fallbacks = _names_list(body.get("fallbacks", []), f"{where}.fallbacks", mistakes)
        if len(fallbacks) > MAX_FALLBACKS:
            mistakes.append(f"{where}.fallbacks: {len(fallbacks)} models, at most {MAX_FALLBACKS}")
        if model_id in fallbacks:
            mistakes.append(f"{where}.fallbacks: a model cannot fall back to itself")
        budget = body.get("token_budget", settings.token_budget)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 16:
            mistakes.append(f"{where}.token_budget: expected a whole number of tokens, at least 16")
            budget = settings.token_budget
        for name in (model_id, *aliases):
            if name in names:
                mistakes.append(f"{where}: {name!r} names two models")
            names.add(name)
        models[model_id] = ModelSpec(model_id, budget, tuple(aliases), tuple(fallbacks))
    return models


def _parse_pools(raw: Any, settings: Settings, models: dict[str, ModelSpec], mistakes: list[str]) -> dict[str, Pool]:
    if not isinstance(raw, dict) or not raw:
        mistakes.append("pools: expected a mapping of pool name -> its settings, at least one")
        return {}
    if len(raw) > MAX_POOLS:
        mistakes.append(f"pools: {len(raw)} pools, at most {MAX_POOLS}")
    pools: dict[str, Pool] = {}
    for name, body, where in _entries(raw, "pools", POOL_NAME, POOL_KEYS, POOL_NAME_RULE, mistakes):
        engine = body.get("engine")
        if not isinstance(engine, str) or not engine:
            mistakes.append(
                f"{where}.engine: expected a runner name (echo, sim:STEP_MS, default, a model path) or {OPENAI_ENGINE}"
            )
            engine = ""
        remote = parse_remote(body, where, engine, mistakes)
        served = _names_list(body.get("models"), f"{where}.models", mistakes)
        if not served:
            mistakes.append(f"{where}.models: expected the ids of the models it serves, at least one")
        for model_id in served:
            if model_id not in models:
                mistakes.append(f"{where}.models: {model_id!r} is not in `models` (list a model by its id)")
        numbers = {
            "partitions": _number(body, "partitions", where, mistakes, int, 1, settings.context_partitions),
            "weight": _number(body, "weight", where, mistakes, float, 0.001, 1.0),
            "workers_cap_seconds": _number(
                body, "workers_cap_seconds", where, mistakes, float, 0.001, settings.workers_cap_seconds
            ),
            "replicas": _number(body, "replicas", where, mistakes, int, 0, 1),
        }
        cap = body.get("workers_cap_messages")
        if cap is not None:
            cap = _number(body, "workers_cap_messages", where, mistakes, int, 1, None)
        elif name == DEFAULT_POOL:
            cap = settings.workers_cap_messages
        max_batch = body.get("max_batch")
        if remote is not None:  # its requests at once: the caps' floor and the worker's prefetch
            max_batch = remote.max_in_flight
        elif max_batch is not None:
            max_batch = _number(body, "max_batch", where, mistakes, int, 1, None)
        topic, group, stage = pool_names(settings, name)
        pools[name] = Pool(
            name,
            engine,
            tuple(served),
            topic,
            group,
            stage,
            int(numbers["partitions"]),
            float(numbers["weight"]),
            cap,
            float(numbers["workers_cap_seconds"]),
            max_batch,
            int(numbers["replicas"]),
            remote,
        )
    return pools


def _entries(
    raw: dict[Any, Any], section: str, name: re.Pattern[str], keys: set[str], rule: str, mistakes: list[str]
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(name, body, where) of each entry of `section` with a valid name and a mapping
    (an empty body: all defaults); the others, and unknown keys, are mistakes."""
    for key, body in raw.items():
        where = f"{section}.{key}"
        body = {} if body is None else body
        if not isinstance(key, str) or not name.fullmatch(key):
            mistakes.append(f"{where}: {rule}")
            continue
        if not isinstance(body, dict):
            mistakes.append(f"{where}: expected a mapping")
            continue
        for unknown in sorted(set(body) - keys, key=str):
            mistakes.append(f"{where}.{unknown}: unknown key (known: {', '.join(sorted(keys))})")
        yield key, body, where


def _names_list(raw: Any, where: str, mistakes: list[str]) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(n, str) and MODEL_ID.fullmatch(n) for n in raw):
        mistakes.append(f"{where}: expected a list of model names")
        return []
    return list(raw)


def _number(
    body: dict[str, Any], key: str, where: str, mistakes: list[str], kind: type, least: float, default: Any
) -> Any:
    value = body.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= least
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        mistakes.append(f"{where}.{key}: expected {'a whole number' if kind is int else 'a number'} >= {least:g}")
        return default if default is not None else least
    return value
