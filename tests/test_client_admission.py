"""The client's pre-send check with a fleet (streams/client_admission.py), over a
hand-fed PressureBoard: the fleet is learnt from the pools' states; QueueFull only
when every pool that could serve the request is full, with the earliest retry; no
pool state yet: today's `processors`, `workers` path."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streams import client_admission
from streams.exceptions import QueueFull
from streams.pressure import FULL, OK, PressureBoard
from tests.test_routing import state

SMOL = {"id": "smol", "aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]}
TINY = {"id": "tiny", "aliases": [], "token_budget": 256, "fallbacks": []}


def pool_state(pool: str, lag: int, level: str = OK, models: list[dict] | None = None, **extra: Any) -> dict:
    return state(f"workers.{pool}", lag, level, pool=pool, models=models or [SMOL], **extra)


def fleet_board(primary: str = OK, fallback: str = OK) -> PressureBoard:
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(state("processors", 0))
    board.publish(pool_state("fast", 120 if primary == FULL else 0, primary, weight=2.0))
    board.publish(pool_state("spare", 110 if fallback == FULL else 0, fallback, [TINY]))
    return board


def request(request_id: str, model: str = "", fallbacks: list[str] | None = None, priority: str = "normal") -> dict:
    return {"request_id": request_id, "priority": priority, "deadline_ms": 0, "model": model, "fallbacks": fallbacks}


def test_without_pool_states_the_path_is_processors_then_workers() -> None:
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(state("processors", 0))
    board.publish(state("workers", 150, FULL))
    with pytest.raises(QueueFull) as refused:
        client_admission.check(board, "normal")  # callable as before fleets
    assert refused.value.stage == "workers"
    board.publish(state("workers", 10))
    asyncio.run(client_admission.admit(board, request("r"), wait=False))
    assert board.admitted("processors") == board.admitted("workers") == 1


def test_a_full_primary_with_a_fallback_that_has_room_is_no_queue_full() -> None:
    board = fleet_board(primary=FULL)
    client_admission.check(board, "normal", model="smol")  # tiny, its default chain, has room
    asyncio.run(client_admission.admit(board, request("r", "gpt-4o-mini"), wait=False))
    assert board.admitted("workers.spare") == 1 and board.admitted("workers.fast") == 0
    assert board.admitted("processors") == 1
    # the request's own fallbacks replace the chain: none that can serve
    with pytest.raises(QueueFull) as refused:
        client_admission.check(board, "normal", model="smol", fallbacks=["smol"])
    assert refused.value.stage == "workers.fast"


def test_every_candidate_full_is_queue_full_with_the_earliest_retry() -> None:
    board = fleet_board(primary=FULL, fallback=FULL)
    with pytest.raises(QueueFull) as refused:
        asyncio.run(client_admission.admit(board, request("r", "smol"), wait=False))
    # spare (110 at 100/s, below 90 in 200 ms) frees before fast (120: 300 ms)
    assert refused.value.stage == "workers.spare" and 150 <= refused.value.retry_after_ms <= 250
    assert board.admitted("processors") == 0  # not sent: counted nowhere


def test_the_processors_stage_is_checked_first_and_an_unknown_model_is_left_to_the_processors() -> None:
    board = fleet_board()
    board.publish(state("processors", 500, FULL))
    with pytest.raises(QueueFull) as refused:
        client_admission.check(board, "normal", model="smol")
    assert refused.value.stage == "processors"
    board.publish(state("processors", 0))
    client_admission.check(board, "normal", model="gpt-5")  # the processors answer it `invalid`


def test_a_request_naming_no_model_is_refused_only_when_every_pool_of_the_fleet_is_full() -> None:
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(state("processors", 0))
    board.publish(pool_state("spare", 110, FULL, [TINY]))  # tiny, first seen, has no fallbacks
    board.publish(pool_state("fast", 0, weight=2.0))
    client_admission.check(board, "normal")  # the fleet file's default may be smol: it has room
    board.publish(pool_state("fast", 120, FULL, weight=2.0))
    with pytest.raises(QueueFull) as refused:
        client_admission.check(board, "normal")
    assert refused.value.stage == "workers.spare"  # the earliest retry of the two


def test_a_pool_removed_from_the_fleet_is_forgotten_once_its_state_stops_coming() -> None:
    """Before, the router learnt the fleet from every state ever seen: a pool removed
    from the fleet file (no longer published) stayed in the client's check, and in the
    gateway's models, for the client's whole life."""
    from streams.pressure import FORGET_STAGE_S

    board = fleet_board()
    router = client_admission.router_of(board)
    assert router is not None and sorted(router.fleet.pools) == ["fast", "spare"]
    board._received_at["workers.spare"] -= FORGET_STAGE_S + 1  # its last state, a minute ago
    router = client_admission.router_of(board)
    assert router is not None and sorted(router.fleet.pools) == ["fast"]
