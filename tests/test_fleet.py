"""The fleet file: pools and models, checked whole at start; without it, today's names."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import Settings
from streams.fleet import DEFAULT_POOL, FleetError, load_fleet, parse_fleet

FLEET = {
    "models": {
        "smol": {"aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]},
        "tiny": {"token_budget": 256},
    },
    "pools": {
        "fast": {"engine": "sim:5", "models": ["smol"], "partitions": 4, "weight": 2},
        "spare": {"engine": "echo", "models": ["smol", "tiny"], "workers_cap_messages": 200},
    },
}


def test_without_a_fleet_file_one_default_pool_keeps_todays_names() -> None:
    settings = Settings(topic_prefix="t.", model="echo", token_budget=300)
    fleet = load_fleet(settings)
    assert fleet.single
    pool = fleet.pools[DEFAULT_POOL]
    assert (pool.contexts_topic, pool.group, pool.stage) == ("t.contexts", settings.worker_group, "workers")
    assert pool.engine == "echo" and pool.partitions == settings.context_partitions
    assert fleet.resolve("echo").token_budget == 300  # type: ignore[union-attr]
    assert [m.id for m in fleet.candidates("")] == ["echo"]


def test_a_fleet_file_names_each_pools_topic_group_and_stage(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    settings = Settings(topic_prefix="t.", fleet_file=str(path))
    fleet = load_fleet(settings)
    fast = fleet.pools["fast"]
    assert (fast.contexts_topic, fast.group, fast.stage) == (
        "t.contexts.fast",
        f"{settings.worker_group}.fast",
        "workers.fast",
    )
    assert fast.weight == 2 and fast.partitions == 4
    assert fleet.pools["spare"].workers_cap_messages == 200
    assert fleet.resolve("gpt-4o-mini").id == "smol"  # type: ignore[union-attr]
    assert [p.name for p in fleet.pools_of("smol")] == ["fast", "spare"]
    # the request's own fallbacks replace the model's default chain; unknown names drop out
    assert [m.id for m in fleet.candidates("gpt-4o-mini")] == ["smol", "tiny"]
    assert [m.id for m in fleet.candidates("tiny", ["nope", "smol", "tiny"])] == ["tiny", "smol"]
    assert fleet.candidates("nope") == []


def test_every_mistake_is_one_line_of_one_error() -> None:
    bad = {
        "models": {"smol": {"token_budget": 3, "fallbacks": ["ghost"], "colour": "red"}, "orphan": {}},
        "pools": {
            "Fast!": {"engine": "echo", "models": ["smol"]},
            "slow": {"models": ["smol", "ghost"], "partitions": 0, "weight": "heavy"},
        },
    }
    with pytest.raises(FleetError) as caught:
        parse_fleet(bad, Settings(), "f.yaml")
    lines = str(caught.value).splitlines()
    assert all(line.startswith("f.yaml: ") for line in lines)
    text = "\n".join(lines)
    for expected in (
        "models.smol.token_budget",
        "models.smol.colour: unknown key",
        "models.smol.fallbacks: 'ghost' is not a model",
        "models.orphan: no pool serves it",
        "pools.Fast!: a pool name",
        "pools.slow.engine",
        "pools.slow.models: 'ghost' is not in `models`",
        "pools.slow.partitions",
        "pools.slow.weight",
    ):
        assert expected in text, expected
    assert len(lines) == 9


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("pools: [unclosed")
    with pytest.raises(FleetError) as caught:
        load_fleet(Settings(fleet_file=str(path)))
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(FleetError, match="cannot read"):
        load_fleet(Settings(fleet_file=str(tmp_path / "missing.yaml")))


def test_clients_learn_the_fleet_from_the_pools_pressure_states() -> None:
    from streams.fleet import fleet_from_states

    states = [
        {"stage": "processors", "pool": "", "models": []},
        {
            "stage": "workers.fast",
            "pool": "fast",
            "partitions": 4,
            "weight": 2.0,
            "models": [{"id": "smol", "aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]}],
        },
        {
            "stage": "workers.spare",
            "pool": "spare",
            "models": [
                {"id": "smol", "aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]},
                {"id": "tiny", "aliases": [], "token_budget": 256, "fallbacks": []},
            ],
        },
    ]
    assert fleet_from_states(states[:1]) is None
    fleet = fleet_from_states(states)
    assert fleet is not None
    assert [m.id for m in fleet.candidates("gpt-4o-mini")] == ["smol", "tiny"]
    assert [p.stage for p in fleet.pools_of("smol")] == ["workers.fast", "workers.spare"]
    assert fleet.pools["fast"].weight == 2.0
