"""The gateway in front of a fleet (issue 26, item 5), driven by the official openai
SDK in process: `models.list()` lists every model of the fleet (ids and aliases),
a chat completion's `model` and `fallbacks` route it, an unknown model is 404
`model_not_found` naming the served ones, and the response's `model` is the one
that served it, with the fallback said where one served. The fleet comes from
FLEET_FILE, else from the pools' pressure states the clients read, else MODEL, and
without a fleet the gateway answers as it did before fleets.

The tenant clients are stand-ins (no broker): what is checked is what the gateway
hands the client and what it makes of the reply; the pipeline's side of routing is
the processors' (tests of their own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from starlette.testclient import TestClient

import gateway.app
from gateway.keys import ApiKeys, digest
from gateway.models import STATES_WAIT_S, FleetView
from streams import Reply, RequestOptions, Settings
from streams.fleet import MAX_FALLBACKS
from streams.reply import Chunk

KEY = "tg-test-key"
FLEET = {
    "models": {"smol": {"aliases": ["gpt-4o-mini"], "fallbacks": ["tiny"]}, "tiny": {}},
    "pools": {"fast": {"engine": "sim:5", "models": ["smol"]}, "spare": {"engine": "echo", "models": ["smol", "tiny"]}},
}
STATES = [  # the same fleet as the pools' PressureStates carry it
    {"stage": "processors", "pool": "", "models": []},
    {
        "stage": "workers.fast",
        "pool": "fast",
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
Answer = Callable[[RequestOptions], Reply]


def served_by_the_model_asked(options: RequestOptions) -> Reply:
    """A reply as a fleet's worker gives it: the public id of the model asked for."""
    model = {"gpt-4o-mini": "smol", "": "smol"}.get(options.model, options.model)
    return Reply(options.request_id or "r", "ok", text="hi back", model=model, tokens_in=3, tokens_out=2)


class FakeClient:
    """A started tenant client, as far as the gateway uses one, with no broker."""

    def __init__(self, states: list[dict[str, Any]], answer: Answer) -> None:
        self.settings = Settings()
        self.states = states
        self.answer = answer
        self.sent: list[RequestOptions] = []
        self._replies: dict[str, Reply] = {}

    def pressure_states(self) -> list[dict[str, Any]]:
        return list(self.states)

    async def submit(self, messages: Any, session_id: str, options: RequestOptions) -> str:
        options = options.replace(request_id=options.request_id or f"r{len(self.sent)}")
        self.sent.append(options)
        self._replies[str(options.request_id)] = self.answer(options)
        return str(options.request_id)

    async def reply(self, request_id: str) -> Reply:
        return self._replies.pop(request_id)

    async def stream(self, messages: Any, session_id: str, options: RequestOptions) -> AsyncIterator[Chunk]:
        reply = self._replies[await self.submit(messages, session_id, options)]
        yield Chunk(reply.request_id, 0, "hi ")
        yield Chunk(reply.request_id, 1, "back", reply.tokens_out, reply)

    async def close(self) -> None:
        pass


class FakeClients:
    """gateway/clients.py's TenantClients, handing out one FakeClient."""

    client: FakeClient

    def __init__(self, settings: Settings) -> None:
        self.started_once = False

    async def get(self, tenant: str) -> FakeClient:
        self.started_once = True
        return self.client

    def started(self) -> list[FakeClient]:
        return [self.client] if self.started_once else []

    async def close(self) -> None:
        pass


@pytest.fixture
def gateway_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[Any, FakeClient]]]:
    """(an openai SDK client on an in-process gateway, its tenant client) for a fleet
    file (or none), the pools' states its client reads, and how requests are answered."""
    made: list[TestClient] = []

    def make(
        fleet: dict[str, Any] | None, states: list[dict[str, Any]] | None = None, answer: Answer | None = None
    ) -> tuple[Any, FakeClient]:
        settings = Settings(model="echo")
        if fleet is not None:
            path = tmp_path / "fleet.yaml"
            path.write_text(yaml.safe_dump(fleet))
            settings = settings.model_copy(update={"fleet_file": str(path)})
        FakeClients.client = FakeClient(states or [], answer or served_by_the_model_asked)
        monkeypatch.setattr(gateway.app, "TenantClients", FakeClients)
        http = TestClient(gateway.app.create_app(settings, ApiKeys({digest(KEY): "acme"})))
        made.append(http)
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        return sdk, FakeClients.client

    yield make
    for http in made:
        http.close()


def user(text: str = "hi") -> list[Any]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("source", ["file", "states"])
def test_models_list_every_model_of_the_fleet_ids_then_aliases(
    gateway_for: Callable[..., tuple[Any, FakeClient]], source: str
) -> None:
    sdk, _ = gateway_for(FLEET) if source == "file" else gateway_for(None, STATES)
    listed = sdk.models.list()
    assert [m.id for m in listed.data] == ["smol", "tiny", "gpt-4o-mini"]
    assert all(m.object == "model" and m.owned_by == "tidegate" and m.created == 0 for m in listed.data)
    alias = sdk.models.retrieve("gpt-4o-mini")
    assert alias.id == "gpt-4o-mini" and (alias.model_extra or {})["root"] == "smol"
    assert sdk.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.models.retrieve("gpt-5")
    assert unknown.value.code == "model_not_found"
    assert "'gpt-5' does not exist; this gateway serves 'smol', 'tiny', 'gpt-4o-mini'" in unknown.value.message


@pytest.mark.parametrize("source", ["file", "states"])
def test_the_model_asked_for_routes_the_request_and_the_response_names_the_one_that_served_it(
    gateway_for: Callable[..., tuple[Any, FakeClient]], source: str
) -> None:
    sdk, client = gateway_for(FLEET) if source == "file" else gateway_for(None, STATES)
    done = sdk.chat.completions.create(model="gpt-4o-mini", messages=user(), max_tokens=8)
    assert done.model == "smol"  # the alias's model, as the reply says (OpenAI answers a snapshot's id)
    assert done.choices[0].message.content == "hi back" and not (done.model_extra or {}).get("tidegate")
    asked = sdk.chat.completions.create(model="tiny", messages=user(), extra_body={"fallbacks": ["smol"]})
    assert asked.model == "tiny"
    assert [(o.model, o.fallbacks) for o in client.sent] == [("gpt-4o-mini", ()), ("tiny", ("smol",))]
    assert client.sent[0].max_new_tokens == 8 and client.sent[0].deadline_s == gateway.app.DEADLINE_S


def test_an_unknown_model_is_404_model_not_found_and_nothing_is_sent(
    gateway_for: Callable[..., tuple[Any, FakeClient]],
) -> None:
    sdk, client = gateway_for(FLEET)
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="gpt-5", messages=user())
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"  # type: ignore[attr-defined]
    assert "'gpt-5' does not exist; this gateway serves 'smol', 'tiny', 'gpt-4o-mini'" in unknown.value.message
    with pytest.raises(openai.NotFoundError, match="fallback model 'ghost' does not exist") as ghost:
        sdk.chat.completions.create(model="smol", messages=user(), extra_body={"fallbacks": ["tiny", "ghost"]})
    assert ghost.value.param == "fallbacks"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError, match="does not exist"):  # streamed alike
        sdk.chat.completions.create(model="gpt-5", messages=user(), stream=True)
    assert client.sent == []


@pytest.mark.parametrize(
    "fallbacks", ["tiny", ["tiny", 5], ["tiny", ""], ["tiny"] * (MAX_FALLBACKS + 1), {"model": "tiny"}]
)
def test_fallbacks_that_are_not_a_short_list_of_names_are_400(
    gateway_for: Callable[..., tuple[Any, FakeClient]], fallbacks: Any
) -> None:
    sdk, client = gateway_for(FLEET)
    with pytest.raises(openai.BadRequestError, match=f"`fallbacks` must be a list of at most {MAX_FALLBACKS}"):
        sdk.chat.completions.create(model="smol", messages=user(), extra_body={"fallbacks": fallbacks})
    assert client.sent == []


def test_a_fallback_that_served_is_said_in_headers_and_body_streamed_or_not(
    gateway_for: Callable[..., tuple[Any, FakeClient]],
) -> None:
    def full(options: RequestOptions) -> Reply:
        served = {"model": "tiny", "fallback_from": "smol", "fallback_reason": "full"}
        return Reply(str(options.request_id), "ok", text="hi back", tokens_out=2, **served)  # type: ignore[arg-type]

    sdk, _ = gateway_for(FLEET, answer=full)
    raw = sdk.chat.completions.with_raw_response.create(model="smol", messages=user())
    assert raw.headers["x-tidegate-fallback-from"] == "smol" and raw.headers["x-tidegate-fallback-reason"] == "full"
    done = raw.parse()
    assert done.model == "tiny"
    assert (done.model_extra or {})["tidegate"] == {"fallback_from": "smol", "fallback_reason": "full"}
    chunks = list(sdk.chat.completions.create(model="smol", messages=user(), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hi back"
    assert chunks[0].model == "smol"  # routed to; the reply not known yet
    assert chunks[-1].model == "tiny" and chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[-1].model_extra or {})["tidegate"]["fallback_reason"] == "full"


def test_the_processors_unknown_model_reply_is_404_too(gateway_for: Callable[..., tuple[Any, FakeClient]]) -> None:
    """The processors' fleet may know less than the gateway's view of it did (a pool
    removed a moment ago): their `invalid` "unknown model" is 404 model_not_found."""

    def unknown(options: RequestOptions) -> Reply:
        return Reply(str(options.request_id), "invalid", error="unknown model 'tiny'; served: smol")

    sdk, _ = gateway_for(FLEET, answer=unknown)
    with pytest.raises(openai.NotFoundError, match="unknown model 'tiny'") as refused:
        sdk.chat.completions.create(model="tiny", messages=user())
    assert refused.value.code == "model_not_found"


@pytest.mark.parametrize(
    "states",
    [
        [],  # no states read (backpressure off, no monitor): MODEL
        [{"stage": "workers", "pool": "default", "models": [{"id": "echo", "aliases": [], "token_budget": 0}]}],
    ],
)
def test_without_a_fleet_the_gateway_answers_as_before_fleets(
    gateway_for: Callable[..., tuple[Any, FakeClient]], states: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any model is served by the one model and the response names the model asked for;
    every request goes as the default model ("", no fallbacks: the one model either
    way), so that it is a request processors from before fleets read (a request naming
    a model is InferenceRequest v3 to them: dead-lettered, the caller answered 504)."""
    monkeypatch.setattr("gateway.models.STATES_WAIT_S", 0.05)
    sdk, client = gateway_for(None, states, answer=lambda o: Reply(str(o.request_id), "ok", text="x", model="echo"))
    assert [m.id for m in sdk.models.list().data] == ["echo"]
    assert sdk.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError, match="'gpt-5' does not exist; this gateway serves 'echo'"):
        sdk.models.retrieve("gpt-5")
    for model in ("gpt-4o-mini", "echo"):
        assert sdk.chat.completions.create(model=model, messages=user(), extra_body={"fallbacks": ["x"]}).model == model
    assert [(o.model, o.fallbacks) for o in client.sent] == [("", ()), ("", ())]


def test_a_fresh_clients_first_states_are_waited_for_once() -> None:
    """A client started a moment ago may not have read the pools' states yet: a name
    the default fleet does not know waits for them (at most STATES_WAIT_S), once."""

    async def scenario() -> tuple[bool, bool, float]:
        view = FleetView(Settings(model="echo"))
        client = FakeClient([], served_by_the_model_asked)
        known = (await view.served([client], ["echo"])).strict  # known to the default: no wait
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: client.states.extend(STATES))
        started = loop.time()
        learned = (await view.served([client], ["smol"])).strict
        return known, learned, loop.time() - started

    known, learned, took = asyncio.run(scenario())
    assert not known and learned and 0.05 < took < STATES_WAIT_S


def test_a_fleet_file_that_is_wrong_stops_the_gateway(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"models": {"smol": {}}, "pools": {"fast": {"models": ["smol"]}}}))
    with pytest.raises(Exception, match=r"pools\.fast\.engine"):
        gateway.app.create_app(Settings(fleet_file=str(path)), ApiKeys({}))


@pytest.mark.integration
@pytest.mark.same_on_any_broker
@pytest.mark.timeout(120)
def test_a_gateway_without_the_fleet_file_learns_the_fleet_from_the_pressure_topic(
    settings_factory: Callable[..., Settings],
) -> None:
    """On the real broker: the pools' PressureStates (as the monitor publishes them)
    are all a gateway with no fleet file needs to list the fleet and refuse an unknown
    model; nothing else of the pipeline runs."""
    from confluent_kafka import Producer

    from schemas import get_codec
    from streams.kafka import producer_config
    from streams.outgoing import now_ms
    from tests.helpers import GatewayProcess

    settings = settings_factory(model="echo")
    producer = Producer(producer_config(settings))
    for state in STATES[1:]:
        record = {"lag": 0, "cap": 100, "state": "ok", "updated_ms": now_ms(), "partitions": 1, **state}
        value = get_codec().encode("PressureState", record)
        producer.produce(settings.topics.pressure, key=state["stage"].encode(), value=value)
    assert producer.flush(10) == 0
    process = GatewayProcess(settings)
    try:
        sdk = openai.OpenAI(base_url=process.base_url, api_key=process.key, max_retries=0)
        assert [m.id for m in sdk.models.list().data] == ["smol", "tiny", "gpt-4o-mini"]
        with pytest.raises(openai.NotFoundError, match="this gateway serves 'smol', 'tiny', 'gpt-4o-mini'") as unknown:
            sdk.chat.completions.create(model="echo", messages=user())
        assert unknown.value.code == "model_not_found"
    finally:
        process.stop()
