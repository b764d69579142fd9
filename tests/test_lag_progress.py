"""Progress over a changing set of partitions (streams/lag.py `Progress`), pure.

The drain rate and the arrival rate are taken from running totals of per-partition
steps, so a partition leaving (a tenant's topic deleted, or missed by a listing) or
coming back moves neither."""

from __future__ import annotations

from streams.lag import Progress
from streams.pressure import PressureGauge, StageCap

SHARED, TENANT = ("requests", 0), ("requests.acme", 0)


def test_a_partition_leaving_or_coming_back_adds_no_step() -> None:
    progress = Progress()
    assert progress.update({SHARED: (1000, 100), TENANT: (5000, 3000)}) == (0, 0)
    assert progress.update({SHARED: (1010, 140), TENANT: (5000, 3000)}) == (10, 40)
    assert progress.update({SHARED: (1020, 180)}) == (20, 80)  # the tenant's partition gone
    assert progress.update({SHARED: (1030, 220), TENANT: (9000, 6000)}) == (30, 120)  # back: its jump is no step
    assert progress.update({SHARED: (1030, 220), TENANT: (9005, 6001)}) == (35, 121)


def test_a_gauge_fed_progress_keeps_its_drain_rate_when_a_tenant_topic_goes() -> None:
    """400 commits a second on the shared topic, 3000 committed on the tenant's; the
    tenant's partition leaves at 8 s: the rate and the seconds-cap stay."""
    gauge = PressureGauge("processors", StageCap(None, 2.0, 32), 0.7)
    progress = Progress()
    states = []
    for tick in range(200):  # 20 s, a sample every 0.1 s
        at = tick / 10
        samples = {SHARED: (20_000, 40 * tick)}
        if at < 8:
            samples[TENANT] = (3000, 3000)
        _, done = progress.update(samples)
        states.append(gauge.update(20_000 - 40 * tick, done, at))
    after = states[60:]
    assert min(s["drain_rate"] for s in after) >= 390
    assert min(s["cap"] for s in after) > 2 * 32
