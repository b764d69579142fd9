"""Settings for every tidegate process, read once from TIDEGATE_* environment variables."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Topics:
    """The topic names of one deployment, all under one prefix (tests use a fresh prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.requests = f"{prefix}requests"
        # a tenant's own request topic, `<requests>.<tenant>`: where its principal may
        # write, and the processors take the tenant from the topic, not from the record
        self.tenant_requests_pattern = rf"^{re.escape(self.requests)}\.[A-Za-z0-9_-]{{1,64}}$"
        self.contexts = f"{prefix}contexts"
        self.replies = f"{prefix}replies"
        self.pressure = f"{prefix}pressure"
        self.dead_letter = f"{prefix}dead-letter"
        # each worker's counts of its ok, error and expired replies, once per
        # STATS_INTERVAL_S: what the lag monitor's circuit breakers judge pools by
        self.outcomes = f"{prefix}outcomes"

    def tenant_requests(self, tenant: str) -> str:
        return f"{self.requests}.{tenant}"

    def tenant_of(self, topic: str) -> str | None:
        """The tenant whose request topic `topic` is, or None for the shared one."""
        return topic[len(self.requests) + 1 :] if topic.startswith(f"{self.requests}.") else None

    def tenant_replies(self, tenant: str) -> str:
        """The prefix of a tenant's reply topics (each client's: `<replies>.<tenant>.<id>`)."""
        return f"{self.replies}.{tenant}."


# broker -> (fetch_wait_ms, control_fetch_wait_ms) where unset
BROKER_FETCH_WAITS = {"kafka": (500, 500), "tansu": (25, 200)}


class Settings(BaseSettings):
    """One frozen settings object per process; defaults are the embedded dev stack's."""

    model_config = SettingsConfigDict(env_prefix="TIDEGATE_", frozen=True, extra="ignore")

    bootstrap: str = "127.0.0.1:9092"
    # How every Kafka client of this process connects (confluent-kafka and faust's
    # aiokafka alike, streams/kafka.py connection_config): SASL/SCRAM identifies a
    # tenant or a stage to the broker's ACLs; TLS where the protocol says SSL.
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-256"
    sasl_username: str | None = None
    sasl_password: str | None = Field(None, repr=False)
    ssl_ca_location: str | None = None  # PEM file of the CA that signed the brokers' certificates
    redis_url: str = "redis://127.0.0.1:6379/0"
    topic_prefix: str = "tidegate."
    request_partitions: int = Field(8, ge=1)
    context_partitions: int = Field(8, ge=1)
    reply_partitions: int = Field(4, ge=1)
    processor_group: str = "tidegate-processors"
    worker_group: str = "tidegate-workers"

    # Which broker the stages talk to: Apache Kafka answers a waiting fetch as soon as
    # data arrives; Tansu re-checks it only every half of the remaining wait, so there
    # the fetch wait is the latency of every hop (docs/design.md).
    broker: Literal["kafka", "tansu"] = "kafka"
    # A consumer's longest wait for data (fetch.wait.max.ms); unset: 500 on Kafka
    # (an upper bound there, not a latency), 25 on Tansu.
    fetch_wait_ms: int | None = Field(None, ge=1, le=1000)
    # The lag monitor's and pressure listeners' consumers: no request waits on them,
    # and every waiting fetch costs Tansu CPU; unset: 500 on Kafka, 200 on Tansu.
    control_fetch_wait_ms: int | None = Field(None, ge=1, le=1000)
    # How long a producer holds a record for company (librdkafka linger.ms). Under
    # load librdkafka batches what queued while earlier requests were in flight anyway.
    linger_ms: int = Field(0, ge=0, le=1000)
    session_timeout_ms: int = Field(6000, ge=1000)
    # The workers' group protocol: `classic` (eager rebalances, roundrobin) or
    # `consumer` (KIP-848: incremental, broker-side assignment; Apache Kafka 4 only)
    worker_group_protocol: Literal["classic", "consumer"] = "classic"
    heartbeat_interval_ms: int = Field(1000, ge=100)

    # Requests
    max_messages: int = Field(64, ge=1)
    max_prompt_chars: int = Field(16_000, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1)

    # Context
    token_budget: int = Field(1024, ge=16)
    system_prompt: str = "You are a helpful assistant."
    history_ttl_s: int = Field(86_400, ge=1)
    history_max_turns: int = Field(400, ge=2)
    # a tenant's share of Redis: the sessions it most recently got answers in keep
    # their history; an older one's is dropped (conversation/history.py); 0: no bound
    tenant_max_sessions: int = Field(10_000, ge=0)
    default_strategy: str = "window"
    processor_batch: int = Field(64, ge=1)
    processor_batch_wait_ms: int = Field(5, ge=0)
    processor_commit_interval_ms: int = Field(200, ge=10)

    # Inference
    model: str = "default"
    max_batch: int = Field(16, ge=1)
    max_wait_ms: int = Field(20, ge=0)
    # A batch also closes at this many prompt tokens, padding counted (rows x longest
    # prompt); with continuous batching it bounds each group that joins the running
    # batch. Measured: `tidegate bench batching` (docs/benchmark-history.md).
    batch_tokens: int = Field(2048, ge=16)
    batching: Literal["continuous", "static"] = "continuous"
    # Continuous batching: waiting requests join the running batch once this many rows
    # are free (or it is empty). Each join is one prefill pass that stalls every row's
    # decoding, so joining one by one costs a pass per step; 0: max_batch // 8.
    join_rows: int = Field(0, ge=0)
    prefix_cache_entries: int = Field(8, ge=0)  # shared system-prompt KV kept per worker; 0: off
    prefix_cache_bytes: int = Field(256 << 20, ge=0)  # and at most this much of it
    stats_interval_s: float = Field(1.0, gt=0)  # worker batching counters to Redis
    response_cache_ttl_s: int = Field(3600, ge=0)  # greedy replies cached in Redis; 0: off
    # the response cache is per tenant; true: one cache across tenants (conversation/response_cache.py)
    response_cache_shared: bool = False
    # a streamed request's new text goes out at most this often (each chunk is a record)
    stream_interval_ms: int = Field(50, ge=0)
    prefetch_limit: int = Field(64, ge=1)  # records a worker holds in memory; partitions pause beyond
    torch_threads: int = Field(2, ge=1)
    # SIGTERM: rows already generating get this long to finish and be replied to
    # (`tidegate dev down` waits 15 s before SIGKILL)
    shutdown_grace_s: float = Field(10.0, ge=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    # The fleet (streams/fleet.py): models and the pools of workers serving them;
    # unset: one pool, `default`, serving MODEL. POOL: the pool a worker serves.
    fleet_file: str | None = None
    pool: str = "default"
    # how the processors choose among a model's pools: by expected wait (lag and
    # drain rate from the pressure topic), or round robin (the benchmark's baseline)
    routing: Literal["pressure", "round_robin"] = "pressure"
    # a remote pool's worker told by its provider to wait (a 429) pauses every worker
    # of the pool through the pressure topic (streams/pauses.py). false is the
    # benchmark's baseline only (`tidegate bench provider`), not for production: each
    # worker keeps its pauses to itself, neither publishing them nor honouring the
    # others' (so no router sees them either), and finds its provider's limit alone
    shared_pool_pauses: bool = True

    # Tenants (streams/tenants.py): quotas and fair-share weights; unset: all unlimited
    tenants_file: str | None = None
    # each tenant sends to its own request topic, `<requests>.<tenant>`, and the
    # processors take the tenant from it (the secured setup: tidegate/tenancy.py)
    tenant_topics: bool = False
    # how often the tenants' request topics are listed again, so a tenant added while
    # the processors run is read without a restart (processors/tenant_topics.py)
    tenant_topics_refresh_s: float = Field(10.0, gt=0)
    # near the workers' cap, each tenant's share of the admissions over this window is
    # held to its weight's share (processors/fairness.py); false: first come, first served
    fair_shares: bool = True
    fair_share_window_s: float = Field(5.0, gt=0)

    # Backpressure (streams/pressure.py). A cap is a message count, or, when that
    # is unset, seconds of work at the stage's measured drain rate.
    backpressure: bool = True
    processors_cap_messages: int | None = Field(None, ge=1)
    processors_cap_seconds: float = Field(2.0, gt=0)
    workers_cap_messages: int | None = Field(None, ge=1)
    workers_cap_seconds: float = Field(4.0, gt=0)
    warn_ratio: float = Field(0.8, gt=0, lt=1)
    pressure_interval_ms: int = Field(200, ge=50)
    pressure_stale_s: float = Field(3.0, gt=0)
    # Circuit breakers, one per pool of a fleet file (ops/breaker.py, run by the lag
    # monitor; without a fleet file every circuit stays closed, as before fleets): a pool
    # opens at CIRCUIT_ERROR_RATIO of `error` replies among at least CIRCUIT_MIN_REPLIES
    # over CIRCUIT_WINDOW_S, or stalled, or with no member and work waiting; it stays
    # open CIRCUIT_OPEN_S (doubled each time in a row, up to CIRCUIT_OPEN_MAX_S), then
    # lets CIRCUIT_PROBES requests per router through, and closes on as many ok replies.
    circuit_window_s: float = Field(30.0, gt=0)
    circuit_min_replies: int = Field(20, ge=1)
    circuit_error_ratio: float = Field(0.5, gt=0, le=1)
    circuit_open_s: float = Field(10.0, gt=0)
    circuit_open_max_s: float = Field(120.0, gt=0)
    circuit_probes: int = Field(5, ge=1)
    # Prometheus text on http://METRICS_HOST:METRICS_PORT/metrics (0: a free port);
    # unset: no endpoint. `dev up` gives every process its own port.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # the window of commits over which a group's health is judged (Burrow's rules)
    health_window_s: float = Field(30.0, gt=0)

    # `dev up` only: nice increment for the broker, Redis, processors and monitor, so
    # on a shared machine the worker (standing in for the accelerator) gets the CPU
    # first; 0 runs everything alike. Production runs each stage on its own machines.
    control_plane_nice: int = Field(5, ge=0, le=19)

    @model_validator(mode="after")
    def _broker_defaults(self) -> Settings:
        """Fills the fetch waits left unset with the broker's defaults."""
        defaults = BROKER_FETCH_WAITS[self.broker]
        for name, value in zip(("fetch_wait_ms", "control_fetch_wait_ms"), defaults, strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        return self

    def join_room(self, active: int, busy: bool) -> int:
        """Rows waiting requests may take in a continuous batch with `active` rows: the
        free rows, but none while a running batch has fewer than `JOIN_ROWS` free
        (default MAX_BATCH // 8): each join is a prefill pass that stalls every row."""
        room = max(0, self.max_batch - active)
        return 0 if busy and room < (self.join_rows or max(1, self.max_batch // 8)) else room

    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)
