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
from typing import Any

import pytest
from confluent_kafka import Producer

from streams import Client, Reply
from streams.kafka import producer_config
from streams.outgoing import build_reply, reply_message
from tests.conftest import SettingsFactory
from tests.helpers import wait_for

pytestmark = pytest.mark.same_on_any_broker

SWEEP_AT = 1024  # pending requests from which the client sweeps abandoned ones (streams/client.py)


class LateAckClient(Client):
    """A client whose event loop stalls (as under a flood: thousands of callbacks) right
    after the broker acknowledged one request (`late_id`), until past that request's
    deadline and grace. During the stall the reply thread reads two real replies off
    the reply topic, another request's (its delivery runs the sweep) and the late
    request's own `expired` one; the loop runs them before `generate` resumes."""

    late_id = ""
    filler_id = ""

    async def _produce(self, request: dict[str, Any]) -> None:
        await super()._produce(request)
        if request["request_id"] == self.late_id:
            self._stall(request)

    def _stall(self, request: dict[str, Any]) -> None:
        read_before = self.replies_read
        producer = Producer(producer_config(self.settings))
        for request_id, status in ((self.filler_id, "ok"), (self.late_id, "expired")):
            o = reply_message(build_reply({"request_id": request_id}, status), self.reply_topic)
            producer.produce(o.topic, o.value, o.key, headers=o.headers)
        assert producer.flush(10) == 0
        past = request["deadline_ms"] / 1000 + self.reply_grace_s + 0.2
        wait_for(lambda: self.replies_read >= read_before + 2 and time.time() > past, 10, "both replies read")


@pytest.mark.timeout(120)
def test_a_request_acknowledged_after_its_deadline_gets_a_reply_not_a_key_error(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(backpressure=False)

    async def scenario() -> Reply:
        async with LateAckClient(settings=settings, reply_grace_s=0.2) as client:
            ids = await asyncio.gather(
                *(client.submit([{"role": "user", "content": "x"}], f"f{i}", deadline_s=60) for i in range(SWEEP_AT))
            )
            client.filler_id, client.late_id = ids[0], uuid.uuid4().hex
            return await client.generate(
                [{"role": "user", "content": "late"}], "late", request_id=client.late_id, deadline_s=0.3
            )

    reply = asyncio.run(scenario())
    assert reply.status == "expired"
