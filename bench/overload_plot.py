"""The overload benchmark's PNG: lag, cap and latency over time, one panel per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 4 * len(runs)), sharex=True)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        lag = run["timeline"]["lag"]
        if lag:
            t, lags, caps = zip(*lag, strict=True)
            ax.plot(t, lags, label="workers' lag", color="tab:blue")
            ax.plot(t, caps, label="cap", color="tab:red", linestyle="--")
        ax.set_ylabel("messages")
        ax.set_title(
            f"{name.replace('_', ' ')}: goodput {run['goodput']}/s, accepted p99 {run['accepted_p99_ms']:.0f} ms, "
            f"QueueFull {run['queue_full_raised']}, lost {run['lost']}"
        )
        lat_ax = ax.twinx()
        latency = run["timeline"]["latency"]
        if latency:
            t, ms = zip(*latency, strict=True)
            lat_ax.scatter(t, [m / 1000 for m in ms], s=2, color="tab:green", alpha=0.3, label="ok latency")
        lat_ax.set_ylabel("latency of ok replies (s)")
        handles = ax.get_legend_handles_labels()[0] + lat_ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left")
    axes[-1].set_xlabel(
        f"seconds since the load started (offered {results['offered_rps']}/s, capacity {results['capacity_rps']}/s)"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
