"""Prometheus metrics of every tidegate process: names prefixed `tidegate_`, base units.

Each process serves its own registry's text format on `METRICS_PORT` (loopback by
default, `METRICS_HOST` otherwise); `tidegate dev up` gives every process a free
port and records the URLs in .tidegate/dev.json under `metrics`. The metrics are
defined here once, whoever updates them, so a name means the same in every
process; a process exports those it updates (and the rest at zero, or empty).

Where each is set: the lag monitor (ops/monitor.py) the lag, status and pressure
gauges; the processors and the client the refusals and retry-after hints; the
workers the batching, latency and token metrics; every consumer its rebalances and
assigned partitions.

Every label value comes from a closed set (`LABEL_VALUES`, per label name): a
value outside it is counted as `other`. Label values are often copied from a
record (a request's `priority`, a refusal's stage), and a crafted one would
otherwise be a new series, kept in memory for the life of the process. The check is
here, in the metric classes, so no call site has to remember it; a metric with a
label name that has no closed set is refused at definition.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client import disable_created_metrics

from streams import health
from streams.outgoing import REPLY_STATUSES
from streams.routing import FALLBACK_REASONS
from streams.validation import PRIORITIES

log = logging.getLogger(__name__)

OTHER = "other"  # what a label value outside its closed set is counted as
STAGES = ("processors", "workers")
DEAD_LETTER_REASONS = ("processor_error", "undecodable", "unanswerable")
BURROW_STATUSES = ("OK", "WARN", "STALL", "STOP", "REWIND")
CIRCUIT_REASONS = ("errors", "stalled", "no_members")  # why a pool's circuit opened (ops/breaker.py)
# a partition as the monitor labels it: `3`, or `acme/3` on tenant `acme`'s own request
# topic (TENANT_TOPICS); a tenant's topic is created by an operator (tidegate/tenancy.py),
# never by a caller, so these values are as many as the deployment's partitions
PARTITION_LABEL = re.compile(r"(?:[A-Za-z0-9_-]{1,64}/)?(?:0|[1-9][0-9]{0,3})")
ClosedSet = frozenset[str] | re.Pattern[str]
LABEL_VALUES: dict[str, ClosedSet] = {
    "stage": frozenset(STAGES),  # and the fleet's pool stages (`workers.<pool>`): allow_label_values
    "priority": frozenset(PRIORITIES),
    # refusals by reply status; dead letters by why; fallbacks by why the model was passed over
    "reason": frozenset(REPLY_STATUSES)
    | frozenset(DEAD_LETTER_REASONS)
    | frozenset(FALLBACK_REASONS)
    | frozenset(CIRCUIT_REASONS),
    "model": frozenset(),  # the fleet's model ids: allow_label_values
    # replies by status; partitions by Burrow's status
    "status": frozenset(REPLY_STATUSES) | frozenset(BURROW_STATUSES),
    "partition": PARTITION_LABEL,
    "pool": frozenset({"default"}),  # and the fleet's pools, from its fleet file: allow_label_values
}


# names a deployment defines itself (its fleet's pool stages and model ids) added to a
# label's closed set, at most this many per label for the life of the process
MAX_ALLOWED_VALUES = 256
_allowed: dict[str, set[str]] = {}
_over: set[str] = set()  # labels whose allowance ran out (logged once)


def allow_label_values(name: str, values: Iterable[str]) -> None:
    """Adds `values` to label `name`'s closed set: names the deployment itself defines,
    the fleet's pool stages and model ids, from its fleet file or its pools' pressure
    states (whoever may write the pressure topic), never a request's fields. Bounded all
    the same: past MAX_ALLOWED_VALUES added to a label, the rest count as `other`."""
    closed = LABEL_VALUES[name]
    if not isinstance(closed, frozenset):
        raise ValueError(f"label {name} has a pattern, not a set of values")
    allowed = _allowed.setdefault(name, set())
    new = [v for v in dict.fromkeys(map(str, values)) if v not in closed]
    room = max(0, MAX_ALLOWED_VALUES - len(allowed))
    if new[room:] and name not in _over:
        _over.add(name)
        log.warning("label %s: %d more values than the %d allowed count as %s", name, len(new) - room, room, OTHER)
    if new[:room]:
        allowed.update(new[:room])
        LABEL_VALUES[name] = closed | frozenset(new[:room])


def bounded_label(name: str, value: object) -> str:
    """`value` as a label value of label `name`: itself when in the closed set, else `other`."""
    text = str(value)
    closed = LABEL_VALUES[name]
    if isinstance(closed, frozenset):
        return text if text in closed else OTHER
    return text if closed.fullmatch(text) else OTHER


class _BoundedLabels:
    """prometheus_client's metric with every label value mapped into its closed set."""

    _labelnames: tuple[str, ...]
    _labelvalues: tuple[str, ...]

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), **kwargs: Any) -> None:
        names = tuple(labelnames)
        if not kwargs.get("_labelvalues"):  # a child (one series) repeats its parent's names
            unknown = [n for n in names if n not in LABEL_VALUES]
            if unknown:
                raise ValueError(f"metric {name}: labels {unknown} have no closed set of values in LABEL_VALUES")
        super().__init__(name, documentation, names, **kwargs)  # type: ignore[call-arg]

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Any:
        values = tuple(bounded_label(n, v) for n, v in zip(self._labelnames, labelvalues, strict=False))
        named = {n: bounded_label(n, v) if n in LABEL_VALUES else v for n, v in labelkwargs.items()}
        return super().labels(*values, **named)  # type: ignore[misc]


class Counter(_BoundedLabels, prometheus_client.Counter):
    pass


class Gauge(_BoundedLabels, prometheus_client.Gauge):
    pass


class Histogram(_BoundedLabels, prometheus_client.Histogram):
    pass


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RETRY_AFTER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# -- the lag monitor ----------------------------------------------------------
LAG_MESSAGES = Gauge(
    "tidegate_lag_messages", "Records accepted and not yet committed, per partition", ["stage", "partition"]
)
LAG_SECONDS = Gauge(
    "tidegate_lag_seconds",
    "Age of the oldest record not yet committed (exact from record timestamps; 0 with no lag)",
    ["stage"],
)
LAG_SECONDS_INTERPOLATED = Gauge(
    "tidegate_lag_seconds_interpolated",
    "Lag in seconds the way kafka-lag-exporter estimates it: when the log end passed the committed offset",
    ["stage"],
)
STAGE_STATUS = Gauge(
    "tidegate_stage_status",
    "Burrow's evaluation of the stage: 0 OK, 1 WARN, 2 ERR (a partition STOP, STALL, REWIND)",
    ["stage"],
)
PARTITION_STATUS = Gauge(
    "tidegate_partition_status", "1 for the partition's current Burrow status", ["stage", "partition", "status"]
)
CAP_MESSAGES = Gauge("tidegate_cap_messages", "The stage's lag cap", ["stage"])
PRESSURE_STATE = Gauge("tidegate_pressure_state", "Published pressure: 0 ok, 1 warn, 2 full", ["stage"])
DRAIN_RATE = Gauge("tidegate_drain_rate_messages_per_second", "Commits per second while the stage had work", ["stage"])
ARRIVAL_RATE = Gauge("tidegate_arrival_rate_messages_per_second", "Records arriving per second", ["stage"])
DRAIN_TIME = Gauge(
    "tidegate_drain_time_seconds", "Lag over (drain rate - arrival rate); -1 when it does not drain", ["stage"]
)
GROUP_MEMBERS = Gauge("tidegate_group_members", "Members of the stage's consumer group", ["stage"])
GROUP_PARTITIONS = Gauge("tidegate_group_partitions", "Partitions of the stage's topic", ["stage"])
CIRCUIT_STATE = Gauge(
    "tidegate_circuit_state", "The pool's circuit breaker: 0 closed, 1 half_open, 2 open (ops/breaker.py)", ["pool"]
)
CIRCUIT_OPENS = Counter("tidegate_circuit_opens", "Times the pool's circuit opened, by why", ["pool", "reason"])

# -- admission: the client and the processors ---------------------------------
REFUSALS = Counter(
    "tidegate_refusals", "Requests refused before any work, by the stage that was full", ["stage", "priority", "reason"]
)
RETRY_AFTER = Histogram(
    "tidegate_retry_after_seconds", "Retry-after hints given with refusals", ["stage"], buckets=RETRY_AFTER_BUCKETS
)
FALLBACKS = Counter(
    "tidegate_fallbacks",
    "Requests forwarded to a fallback model, by the model asked for and why it was passed over",
    ["model", "reason"],
)

# -- every stage --------------------------------------------------------------
DEAD_LETTERS = Counter("tidegate_dead_letters", "Records sent to the dead-letter topic", ["stage", "reason"])
REDIS_DEGRADED = Gauge("tidegate_redis_degraded", "1 while the stage goes on without Redis", ["stage"])
REDIS_WRITE_REFUSALS = Counter(
    "tidegate_redis_write_refusals", "Writes Redis refused (OOM past maxmemory, a wrong key type)", ["stage"]
)
REBALANCES = Counter("tidegate_rebalances", "Partition assignments received by this member", ["stage"])
ASSIGNED_PARTITIONS = Gauge("tidegate_assigned_partitions", "Partitions this member owns", ["stage"])

# -- the workers --------------------------------------------------------------
QUEUE_WAIT = Histogram(
    "tidegate_queue_wait_seconds",
    "From the record's timestamp on the contexts topic to the worker taking it",
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tidegate_time_to_first_token_seconds", "From the request's creation to its first token", buckets=LATENCY_BUCKETS
)
END_TO_END = Histogram(
    "tidegate_request_duration_seconds",
    "From the request's creation to its reply, by status",
    ["status"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("tidegate_batch_size", "Rows in a decode step or static batch", buckets=BATCH_BUCKETS)
PADDING_SHARE = Gauge("tidegate_padding_ratio", "Share of prefill positions that were padding")
TOKENS_GENERATED = Counter("tidegate_generated_tokens", "Tokens generated")
DECODE_STEPS = Counter("tidegate_decode_steps", "Decode steps run")
REPEATED_REQUESTS = Counter(
    "tidegate_repeated_requests", "Requests generated again after a redelivery (their reply went out twice)"
)
# the workers of a remote pool (`engine: openai`, inference/remote_worker.py)
PROVIDER_CALLS = Counter(
    "tidegate_provider_calls",
    "Calls to a remote pool's provider, by how they ended (rate_limited: its 429s; expired: closed, caller gone)",
    ["pool", "status"],
)
POOL_PAUSED = Gauge(
    "tidegate_pool_paused", "1 while the pool's provider asked it to wait (streams/pauses.py)", ["pool"]
)

STATUS_CODES = {"ok": 0, "warn": 1, "full": 2}


def serve_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Serves the default registry on `host:port` (0: a free port), with the stage's
    /healthz and /readyz (streams/health.py); returns the port, or None when `port`
    is None (metrics and probes off)."""
    if port is None:
        return None
    disable_created_metrics()  # no *_created series beside every counter and histogram
    server = health.start_server(port, host)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
