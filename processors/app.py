"""The processors' faust app: reads tidegate.requests in batches, writes envelopes.

The work itself is `RequestHandler` (processors/handler.py); this module wires it
to faust: one agent, batches from `take_batches`, every output awaited before the
batch's offsets can be committed. A failure is its record's (the handler answers
it `error`); should handling still fail for a whole batch, each record not answered
yet is answered `error` where a reply can be built and dead-lettered where not,
never skipped and never answered twice (`RequestHandler.answer`).
faust consumes and commits; the outputs go through a confluent-kafka producer
(streams/delivery.py), idempotent, whose per-record cost is librdkafka's C code
rather than aiokafka's Python send path.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import shutil
import ssl
import tempfile
from typing import Any

import faust
from redis.asyncio import Redis

from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from processors.admission import STAGE
from processors.event_batches import take_batches
from processors.faust_tuning import QuietWorker, set_fetch_wait_ms
from processors.handler import Deliver, Incoming, RequestHandler
from processors.routes import (
    downstream_admission,  # noqa: F401  (where the handler's tests find it)
    fleet_or_exit,
    pool_admission,
)
from processors.tenant_topics import TenantTopics, listed_request_topics
from streams import metrics
from streams.config import Settings
from streams.delivery import DeliveryFailed, DeliveryProducer
from streams.kafka import producer_config
from streams.lifecycle import announce_ready
from streams.outgoing import Outgoing
from streams.pressure import FORWARD_TRANSIT_MS, PressureBoard
from streams.pressure_feed import PressureListener
from streams.reply_topics import ReplyTopics
from streams.routing import Router
from streams.tenants import Tenants

log = logging.getLogger(__name__)
DELIVERY_RETRY_MAX_S = 5.0


def acknowledged_delivery(delivery: DeliveryProducer) -> Deliver:
    """The handler's `deliver`: every output acknowledged before the batch is acked.
    librdkafka retries a record itself until its message timeout; past that (the
    broker gone for minutes) the whole batch is sent again rather than committed
    past: consumers dedupe by request_id. A record the broker refuses for good is
    replaced by its fallback (an envelope's: its `error` reply; a reply's: the
    record's dead letter), so no batch is sent again forever."""

    async def deliver(outgoing: list[Outgoing]) -> None:
        attempt = 0
        while True:
            try:
                await delivery.send_all(outgoing)
                return
            except DeliveryFailed as exc:
                attempt += 1
                log.warning("attempt=%d %s; sending the batch again", attempt, exc)
                await asyncio.sleep(min(DELIVERY_RETRY_MAX_S, 0.1 * 2**attempt))

    return deliver


def _incoming(event: Any) -> Incoming:
    message = event.message
    return Incoming(
        value=message.value,
        key=message.key,
        headers=list(message.headers or ()),
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
    )


def request_topics(settings: Settings) -> list[str]:
    """The shared request topic and, with TENANT_TOPICS, the tenants' own as the
    broker lists them now (faust itself waits for a broker that does not answer:
    then the tenants' topics come with the first refresh)."""
    return listed_request_topics(settings) or [settings.topics.requests]


def broker_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """faust's (aiokafka's) side of the settings' SASL and TLS, as streams/kafka.py's
    connection_config is confluent-kafka's."""
    tls = settings.security_protocol in ("SSL", "SASL_SSL")
    context = ssl.create_default_context(cafile=settings.ssl_ca_location) if tls else None
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context is not None else None


def create_app(settings: Settings) -> faust.App:
    fleet = fleet_or_exit(settings)  # a wrong fleet file: one line per mistake, exit 2
    set_fetch_wait_ms(settings.fetch_wait_ms)
    # faust wants a data directory even with no tables; its default ({appid}-data in
    # the working directory) would litter wherever the processor was started
    datadir = tempfile.mkdtemp(prefix="tidegate-faust-")
    atexit.register(shutil.rmtree, datadir, ignore_errors=True)
    app = faust.App(
        settings.processor_group,
        broker=f"kafka://{settings.bootstrap}",
        broker_credentials=broker_credentials(settings),
        value_serializer="raw",
        key_serializer="raw",
        datadir=datadir,
        Worker=QuietWorker,
        web_enabled=False,
        web_bind="127.0.0.1",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.request_partitions,
        producer_linger=0.002,
        # lag is log end minus *committed* offsets: faust's default 2.8 s commit
        # interval would show seconds of finished work as backlog
        broker_commit_interval=settings.processor_commit_interval_ms / 1000,
    )
    # the shared request topic and every tenant's own (`<requests>.<tenant>`): listed
    # again every TENANT_TOPICS_REFRESH_S, so a tenant added later is read too
    requests = app.topic(*request_topics(settings), key_type=bytes, value_type=bytes)
    if settings.tenant_topics:
        tenant_topics = TenantTopics(settings, app)
        app.timer(settings.tenant_topics_refresh_s)(tenant_topics.refresh)
    redis = Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    admission = release = fullness = None
    if settings.backpressure:
        board = PressureBoard(settings.pressure_stale_s, settings.warn_ratio, transit_ms=FORWARD_TRANSIT_MS)
        pressure = PressureListener(settings, board)
        pressure.start()
        # every request routed among the pools that serve its model (streams/routing.py)
        admission, release, fullness = pool_admission(Router(fleet, board, settings.routing))
    delivery = DeliveryProducer(producer_config(settings))  # started with the agent, not here
    counter = TokenCounter(load_counting_tokenizer(settings.model))
    handler = RequestHandler(
        settings,
        redis,
        counter,
        admission,
        ReplyTopics(settings, delivery),
        fullness,
        Tenants.load(settings),
        release,
        fleet,
    )
    wait_s = settings.processor_batch_wait_ms / 1000

    deliver = acknowledged_delivery(delivery)

    @app.agent(requests)
    async def process(stream: Any) -> None:
        # before the group join: the first batch must not wait for the producer's id,
        # or its envelopes reach the log after the pressure board forgot its admissions
        await asyncio.to_thread(delivery.start)
        async for events in take_batches(stream, settings.processor_batch, wait_s):
            # a batch failing as a whole: each record not answered yet answered `error`
            await handler.answer([_incoming(e) for e in events], deliver)

    @app.on_before_shutdown.connect
    async def on_shutdown(app: faust.App, **kwargs: Any) -> None:
        await asyncio.to_thread(delivery.close)

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        log.warning("processor assigned %d partitions", len(assigned))
        metrics.REBALANCES.labels(STAGE).inc()
        metrics.ASSIGNED_PARTITIONS.labels(STAGE).set(len(assigned))
        announce_ready()

    return app
