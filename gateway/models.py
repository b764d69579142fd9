"""The models the gateway serves (`GET /v1/models`), and the model a chat completion
is sent for.

The gateway learns its fleet from, in order: FLEET_FILE (streams/fleet.py
load_fleet, read once at start: a wrong file stops the gateway with one line per
mistake); else the pools' PressureStates its tenant clients read (fleet_from_states:
the lag monitor publishes each pool's models, so a gateway needs no copy of the
file); else the one model it served before fleets (MODEL).

A fleet from the file, or from states naming more than the one `default` pool or
more than one model, is *strict*: a `model` or `fallbacks` entry that is neither a
model id nor an alias is answered 404 `model_not_found`, naming the served models,
before anything is sent; the response's `model` is the one that served it (the
reply's). The default fleet is *lenient*, as the gateway was before fleets: any
`model` is served by the one model (SDK code written for `gpt-4o-mini` keeps
working), every request is sent as asking for the fleet's default ("", which the
processors serve without question, and processors from before fleets read) and the
response's `model` is the one asked for. `GET /v1/models/{id}` is 404 for an unknown name either way, as before.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from streams import Client, Reply, Settings
from streams.exceptions import TidegateError
from streams.fleet import Fleet, default_fleet, fleet_from_states, load_fleet

# how long a client started a moment ago is given to read its first pressure states
# (the monitor republishes every stage each second; a fresh board replays the recent
# ones at once), once per client, and only when a name would otherwise be unknown
STATES_WAIT_S = 1.0


class UnknownModel(TidegateError):
    """A chat completion names a model the fleet does not serve (`param`: the field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ServedModels:
    """The fleet as the gateway knows it at one moment, and how strictly it is held to."""

    fleet: Fleet
    strict: bool

    def listing(self) -> list[dict[str, Any]]:
        """`GET /v1/models`'s data: every id, then every alias, each an OpenAI model object."""
        return [self._entry(name) for name in self.fleet.names()]

    def entry(self, name: str) -> dict[str, Any] | None:
        """The model object of an id or alias, or None."""
        return self._entry(name) if self.fleet.resolve(name) is not None else None

    def _entry(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "tidegate"}
        spec = self.fleet.resolve(name)
        if spec is not None and spec.id != name:
            entry["root"] = spec.id  # an alias: the model it names (vLLM's field for it)
        return entry

    def not_found(self, name: str, what: str = "model") -> str:
        served = ", ".join(repr(n) for n in self.fleet.names())
        return f"The {what} {name[:80]!r} does not exist; this gateway serves {served}"

    def route(self, model: str, fallbacks: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        """The request's (`model`, `fallbacks`): as asked where strict (an unknown name
        raises UnknownModel); where lenient ("", ()): the fleet has one model, its
        default, whatever is asked, and a request naming no model is one processors
        from before fleets read (one naming a model is a schema they do not know).

        :raises UnknownModel: strict, and a name is neither an id nor an alias."""
        if not self.strict:
            return "", ()
        if model and self.fleet.resolve(model) is None:
            raise UnknownModel(self.not_found(model), "model")
        for name in fallbacks:
            if self.fleet.resolve(name) is None:
                raise UnknownModel(self.not_found(name, "fallback model"), "fallbacks")
        return model, tuple(fallbacks)

    def shown(self, asked: str, reply: Reply | None = None) -> str:
        """The response's `model`: where strict the one that served it (the reply's;
        before a reply, the id the asked name resolves to); where lenient the name
        asked for, as before fleets (the reply's where none was)."""
        if not self.strict:
            return asked or (reply.model if reply is not None else "")
        if reply is not None and reply.model:
            return reply.model
        spec = self.fleet.resolve(asked) if asked else self.fleet.default_model
        return spec.id if spec is not None else asked

    def knows(self, names: Iterable[str]) -> bool:
        return all(self.fleet.resolve(name) is not None for name in names if name)


class FleetView:
    """Where the gateway's fleet comes from (the file, the clients' pressure boards,
    MODEL), read afresh on each call: a pool the monitor starts publishing is served
    from its next state on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.file_fleet = load_fleet(settings) if settings.fleet_file else None
        self._waited: weakref.WeakSet[Client] = weakref.WeakSet()

    async def served(self, clients: Sequence[Client], names: Sequence[str] | None = None) -> ServedModels:
        """The served models now. `names`: those a request asks for; None: a listing.
        Where the fleet is not known yet from states (a client's board empty, its
        first states not read) and a name is unknown or a listing is asked, each such
        client is given up to STATES_WAIT_S, once, to read them."""
        if self.file_fleet is not None:
            return ServedModels(self.file_fleet, strict=True)
        served, learned = self._from_states(clients)
        if learned or (names is not None and served.knows(names)):
            return served
        fresh = [c for c in clients if c.settings.backpressure and c not in self._waited and not c.pressure_states()]
        if not fresh:
            return served
        give_up_at = time.monotonic() + STATES_WAIT_S
        while time.monotonic() < give_up_at and not any(c.pressure_states() for c in fresh):
            await asyncio.sleep(0.02)
        self._waited.update(fresh)
        return self._from_states(clients)[0]

    def _from_states(self, clients: Sequence[Client]) -> tuple[ServedModels, bool]:
        """(the served models, whether they came from the pools' states)."""
        for client in clients:
            fleet = fleet_from_states(client.pressure_states())
            if fleet is not None:
                strict = not fleet.single or len(fleet.models) > 1
                return ServedModels(fleet, strict), True
        return ServedModels(default_fleet(self.settings), strict=False), False
