"""The Pareto fronts of a study: per size, the modes (or encoder pairs and modes) that no other beats on
the selection metric at a lower cost, for each cost users pay (train time, inference time per example,
peak memory), and their plot ``study_pareto.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

PARETO_COSTS = ("train_time_s", "inference_ms_per_example", "peak_memory_mb")


def pareto_fronts(rows: list[dict[str, Any]], sizes: list[float]) -> list[dict[str, Any]]:
    """Per size and per cost (``PARETO_COSTS``): the modes (or pairs and modes) on the Pareto front of the
    selection split's mean against that cost: none other has a mean at least as high at a cost at most
    as low, better in one. Each front is ordered by cost; ``points`` holds every (mode, mean, costs)."""
    fronts = []
    for size in sizes:
        here = [r for r in rows if r["size"] == size and math.isfinite(r["selection"]["mean"])]
        points = [
            {"mode": r["mode"], "mean": r["selection"]["mean"], **{k: r["cost"].get(k) for k in PARETO_COSTS}}
            for r in here
        ]
        entry: dict[str, Any] = {"size": size, "train_rows": here[0]["train_rows"] if here else None}
        for key in PARETO_COSTS:
            known = [p for p in points if p[key] is not None]
            front = [
                p
                for p in known
                if not any(
                    q["mean"] >= p["mean"] and q[key] <= p[key] and (q["mean"] > p["mean"] or q[key] < p[key])
                    for q in known
                )
            ]
            entry[key] = [p["mode"] for p in sorted(front, key=lambda p: p[key])]
        fronts.append({**entry, "points": points})
    return fronts


def plot_pareto(result: dict[str, Any], folder: Path) -> Path:
    """``study_pareto.png``: per size (a row) and cost (a column: train time, inference time per example,
    peak memory), each mode's (or pair and mode's) selection mean against the cost, its Pareto front
    joined."""
    from matplotlib.figure import Figure

    fronts = result["summary"]["pareto"]
    labels = {"train_time_s": "train time (s)", "inference_ms_per_example": "inference (ms/example)",
              "peak_memory_mb": "peak memory (MiB)"}  # fmt: skip
    modes = sorted({p["mode"] for f in fronts for p in f["points"]})
    fig = Figure(figsize=(12, 2.8 * len(fronts)), dpi=110)
    axes = fig.subplots(len(fronts), len(labels), squeeze=False)
    for row, front in zip(axes, fronts):
        for ax, (key, label) in zip(row, labels.items()):
            by_mode = {p["mode"]: p for p in front["points"] if p[key] is not None}
            for mode, p in by_mode.items():
                ax.scatter([p[key]], [p["mean"]], color=f"C{modes.index(mode)}", label=mode, zorder=3)
            line = [by_mode[m] for m in front[key] if m in by_mode]
            ax.plot([p[key] for p in line], [p["mean"] for p in line], color="grey", linestyle="--", zorder=2)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(f"{result['metric']} ({result['selection_split']})", fontsize=8)
            ax.set_title(f"{front['train_rows']:,.0f} train rows", fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Pareto fronts: higher and further left is better (dashed: the front)", fontsize=10)
    fig.tight_layout()
    path = folder / "study_pareto.png"
    fig.savefig(path)
    return path
