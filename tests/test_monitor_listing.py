"""The monitor keeps publishing while the broker's topics are listed slowly (issue 25, item 8).

The lag reader lists the topics again every few seconds to find the tenants' topics,
and reads a new partition's start and end offsets. Both ran on the monitor's own
loop: a listing that took seconds (the listing grows with every client's reply
topic) or a new tenant's partitions without a leader yet (up to 2 s each) stopped
every stage's states for that long, and the readers saw them go stale. The fault
points stall the listing, or a new partition's offsets, for INJECTED_STALL_S."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from schemas import get_codec
from streams.lag import PROCESSORS
from streams.lag_topics import INJECTED_STALL_S
from streams.outgoing import now_ms
from tests.conftest import Pipeline
from tests.helpers import TopicReader, wait_for
from tests.test_tenant_lag import create_tenant_topic

MAX_GAP_MS = 2500  # states come every 200 ms while anything moves, at least every second


def published(reader: TopicReader, stage: str) -> list[dict]:
    """The states the monitor published for `stage`, in the order measured."""
    codec = get_codec()
    states = (codec.decode(m.value(), "PressureState")[1] for m in reader.poll())
    return sorted((s for s in states if s["stage"] == stage), key=lambda s: s["updated_ms"])


def published_ms(reader: TopicReader, stage: str) -> list[int]:
    return [s["updated_ms"] for s in published(reader, stage)]


@pytest.mark.parametrize("fault", ["lag-list-slow", "lag-watermark-slow"])
def test_the_monitor_publishes_at_its_interval_while_a_listing_is_slow(
    pipeline_factory: Callable[..., Pipeline], fault: str
) -> None:
    """A stalled listing (or a stalled read of a new tenant partition's offsets) used
    to stop the monitor's states for the stall's length; it happens beside the loop."""
    pipeline = pipeline_factory(roles=(), tenant_topics=True)
    pipeline.start(("monitor",), extra_env={"TIDEGATE_FAULTS": fault})
    create_tenant_topic(pipeline, "acme")  # a new partition for the offsets' stall to hit
    log_path = pipeline.log_dir / "ops.log"
    reader = TopicReader(pipeline.settings, pipeline.settings.topics.pressure)
    try:
        wait_for(lambda: "stalled by TIDEGATE_FAULTS" in log_path.read_text(errors="replace"), 20, f"the {fault} stall")
        stalled_ms = now_ms()
        # past the stall's end, and the tenant counted once it ended
        wait_for(
            lambda: any(t > stalled_ms + (INJECTED_STALL_S + 1) * 1000 for t in published_ms(reader, PROCESSORS)),
            30,
            "states published after the stall",
        )
        # from the stall's start (as logged) to the first state past its end
        around = [stalled_ms] + [t for t in published_ms(reader, PROCESSORS) if t > stalled_ms]
        around = around[: next(i for i, t in enumerate(around) if t > stalled_ms + INJECTED_STALL_S * 1000) + 1]
        gap = max(b - a for a, b in itertools.pairwise(around))
        print(f"LISTING {fault}: longest gap between published states {gap} ms over {len(around)} states")
        assert gap < MAX_GAP_MS, f"no state for {gap} ms while the listing stalled"
        # the listing's result still arrives: the tenant's partitions are counted
        partitions = 2 * pipeline.settings.request_partitions
        wait_for(
            lambda: published(reader, PROCESSORS)[-1]["partitions"] == partitions, 20, "the tenant's partitions counted"
        )
    finally:
        reader.close()
