"""Issue 25, item 8: the client's windows between sending a request and claiming its reply.

Under a flood with backpressure off, `Client.generate` raised `KeyError: '...' is not a
pending request of this client`: a request whose broker acknowledgement came after
its deadline and grace was swept as abandoned (the sweep drops unclaimed requests
past their time once 1024 are pending) before `generate` claimed it. A caller gets
its reply, `expired` or `ReplyTimeout`, never a KeyError.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer

from streams import Client, Reply
from streams import client as client_module
from streams.kafka import producer_config
from streams.outgoing import build_reply, reply_message
from tests.conftest import SettingsFactory
from tests.helpers import wait_for

pytestmark = pytest.mark.same_on_any_broker

SWEEP_AT = 1024  # pending requests from which the client sweeps abandoned ones (streams/client.py)


class LateAckClient(Client):
    """A client whose event loop stalls (as under a flood: thousands of callbacks) right
    after the broker acknowledged one request (`late_id`), until past that request's
    deadline and grace. During the stall the reply thread reads real replies off the
    reply topic (`during_stall`): another request's, whose delivery runs the sweep, and
    the late request's own `expired` one; the loop runs them before `submit` resumes."""

    late_id = ""
    during_stall: tuple[tuple[str, str], ...] = ()  # (request_id, status) of the replies read

    async def _produce(self, request: dict[str, Any]) -> None:
        await super()._produce(request)
        if request["request_id"] == self.late_id:
            read_before = self.replies_read
            self.send_replies(self.during_stall)
            past = request["deadline_ms"] / 1000 + self.reply_grace_s + 0.2
            wait_for(
                lambda: self.replies_read >= read_before + len(self.during_stall) and time.time() > past,
                10,
                "the replies",
            )

    def send_replies(self, replies: tuple[tuple[str, str], ...]) -> None:
        """Replies produced to this client's reply topic by a real producer, as a worker would."""
        producer = Producer(producer_config(self.settings))
        for request_id, status in replies:
            o = reply_message(build_reply({"request_id": request_id}, status), self.reply_topic)
            producer.produce(o.topic, o.value, o.key, headers=o.headers)
        assert producer.flush(10) == 0


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Returns once `check()` holds, on the event loop (its callbacks run meanwhile);
    TimeoutError naming `what` after `timeout_s`."""
    give_up_at = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > give_up_at:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def _fill(client: Client) -> list[str]:
    """SWEEP_AT requests pending, far from their deadlines: the sweep runs on each delivery."""
    messages = [{"role": "user", "content": "x"}]
    return list(await asyncio.gather(*(client.submit(messages, f"f{i}", deadline_s=60) for i in range(SWEEP_AT))))


@pytest.mark.timeout(120)
def test_a_request_acknowledged_after_its_deadline_gets_a_reply_not_a_key_error(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(backpressure=False)

    async def scenario() -> Reply:
        async with LateAckClient(settings=settings, reply_grace_s=0.2) as client:
            filler = (await _fill(client))[0]
            client.late_id = uuid.uuid4().hex
            client.during_stall = ((filler, "ok"), (client.late_id, "expired"))
            return await client.generate(
                [{"role": "user", "content": "late"}], "late", request_id=client.late_id, deadline_s=0.3
            )

    reply = asyncio.run(scenario())
    assert reply.status == "expired"


@pytest.mark.timeout(120)
def test_a_request_acknowledged_late_can_still_be_claimed_after_submit_returns(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit`, then `reply` a moment later (the gateway claims in a task of its own,
    one loop turn after `submit` returned): a sweep in between must not take a request
    acknowledged past its deadline and grace for abandoned. Here the moment is two
    replies long, within the client's grace (2 s)."""
    monkeypatch.setattr(client_module, "SWEEP_INTERVAL_S", 0.0)  # a sweep on every delivery
    settings = settings_factory(backpressure=False)

    async def scenario() -> Reply:
        async with LateAckClient(settings=settings, reply_grace_s=2.0) as client:
            fillers = await _fill(client)
            client.late_id = uuid.uuid4().hex
            client.during_stall = ((fillers[0], "ok"),)
            messages = [{"role": "user", "content": "late"}]
            submitted_at = time.time()
            request_id = await client.submit(messages, "late", request_id=client.late_id, deadline_s=0.3)
            sweeps = client._pending.sweeps
            await asyncio.to_thread(client.send_replies, ((fillers[1], "ok"),))
            # the reply thread reads it; its delivery on the loop sweeps
            await until(lambda: client._pending.sweeps > sweeps, 10, "a sweep after submit returned")
            # the window was reached: a sweep ran between submit and reply, past the
            # request's own deadline and grace, and left the request to its caller
            assert time.time() > submitted_at + 0.3 + client.reply_grace_s
            assert request_id in client._pending and not client._pending[request_id].claimed
            await asyncio.to_thread(client.send_replies, ((request_id, "expired"),))
            return await client.reply(request_id, timeout_s=10)

    reply = asyncio.run(scenario())
    assert reply.status == "expired"
