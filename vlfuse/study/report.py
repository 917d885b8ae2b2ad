"""The study's report: ``study.json``, ``study.md``, the plots, and the table in the recommended runs'
model cards."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from vlfuse.compare import label_and_save, rewrite_card
from vlfuse.hub import CONFIG_NAME
from vlfuse.study.grid import Cell, cell_dir

COST_COLUMNS = {
    "trainable": "trainable params",
    "wall_time_s": "wall time (s)",
    "train_samples_per_s": "train samples/s",
    "peak_memory_mb": "peak memory (MiB)",
    "final_bytes": "saved model (MiB)",
}


def _size_label(row: dict[str, Any]) -> str:
    rows = row.get("train_rows")
    return f"{row['size']:g}" + (f" ({rows:,} rows)" if rows else "")


def _num(value: float, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cost(key: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if key == "trainable":
        return f"{value:,.0f}"
    if key == "final_bytes":
        return f"{value / 2**20:.1f}"
    return f"{value:.1f}"


def results_table(result: dict[str, Any]) -> list[str]:
    """The per (size, mode) table: chosen rate, mean and interval on the report split, costs."""
    level = f"{result['confidence']:.0%} CI"
    head = ["train size", "mode", "lr", f"{result['metric']} mean", level, "seeds", *COST_COLUMNS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["summary"]["rows"]:
        ci = f"[{_num(r['low'])}, {_num(r['high'])}]"
        costs = [_cost(k, r["cost"].get(k)) for k in COST_COLUMNS]
        cells = [_size_label(r), r["mode"], f"{r['lr']:.3g}", _num(r["mean"]), ci, str(r["n"]), *costs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recommendation_lines(result: dict[str, Any]) -> list[str]:
    summary = result["summary"]
    lines = []
    for rec in summary["recommendation"]:
        if rec["recommended"] is None:
            lines.append(f"- size {rec['size']:g}: no finished trial")
            continue
        tied = [m for m in rec["indistinguishable"] if m != rec["recommended"]]
        p = ", ".join(f"{m}: p={v:.3g}" for m, v in rec["p_values"].items() if math.isfinite(v))
        lines.append(
            f"- size {_size_label(rec)}: **{rec['recommended']}** (lr {rec['lr']:.3g}); best mean: "
            f"{rec['best']}; indistinguishable from the best: {', '.join(tied) or 'none other'}"
            + (f" ({p})" if p else " (one seed: nothing to test)")
        )
    for mode, size in summary["overtakes_frozen"].items():
        lines.append(
            f"- {mode} overtakes none (frozen) from size {size:g} on"
            if size is not None
            else f"- {mode} does not overtake none (frozen) within the sizes run"
        )
    return lines


def study_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"# Study: which mode for this data? ({result['task']}, {result['metric']})",
        "",
        f"Learning rates were chosen per (mode, train size) on split `{result['selection_split']}` by the "
        f"mean over seeds; the numbers below are on split `{result['report_split']}`, for the chosen rate "
        "only: that split chose nothing.",
        f"{result['trials']} finished trials ({len(result['cells'])} cells); train sizes are "
        "nested (a smaller set is part of every larger one).",
        *(
            []
            if result["complete"]
            else [
                "",
                "**Partial**: some trials are still running on other workers, or failed; running the "
                "command again finishes the study and rewrites this report.",
            ]
        ),
        "",
        *results_table(result),
        "",
        "## Recommendation",
        "",
        f"Rule: for each train size, the cheapest mode (fewest trainable parameters, then least wall time) "
        f"whose mean is not told apart from the best mode's by a {s['test']} at level {s['alpha']:.2g}.",
        "",
        *recommendation_lines(result),
    ]
    return "\n".join(lines) + "\n"


def plot_study(result: dict[str, Any], folder: Path) -> list[Path]:
    """``study_curves.png`` (the metric against train size per mode, with its confidence band) and
    ``study_cost.png`` (each mode's costs at the largest size)."""
    from matplotlib.figure import Figure  # slow to import; only the plots need it

    rows = result["summary"]["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig = Figure(figsize=(6.5, 4.2), dpi=120)
    ax = fig.subplots()
    for mode in modes:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["size"])
        x = [r.get("train_rows") or r["size"] for r in mine]
        ax.plot(x, [r["mean"] for r in mine], marker="o", label=mode)
        ax.fill_between(x, [r["low"] for r in mine], [r["high"] for r in mine], alpha=0.2)
    ax.set_xscale("log")
    curves = folder / "study_curves.png"
    label_and_save(
        fig,
        ax,
        curves,
        ("train rows", f"{result['metric']} ({result['report_split']})"),
        f"{result['task']}: mean over seeds, {result['confidence']:.0%} CI band",
        "mode",
    )

    largest = max(r["size"] for r in rows)
    at_largest = {r["mode"]: r for r in rows if r["size"] == largest}
    fig = Figure(figsize=(12, 2.8), dpi=120)
    axes = fig.subplots(1, len(COST_COLUMNS))
    for ax, (key, label) in zip(axes, COST_COLUMNS.items()):
        values = [
            at_largest[m]["cost"].get(key, float("nan")) if m in at_largest else float("nan") for m in modes
        ]
        ax.bar(modes, [v / 2**20 if key == "final_bytes" else v for v in values])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"cost per mode at train size {largest:g}", fontsize=10)
    fig.tight_layout()
    cost = folder / "study_cost.png"
    fig.savefig(cost)
    return [curves, cost]


def recommended_dirs(result: dict[str, Any], records: list[dict[str, Any]], root: Path) -> list[Path]:
    """The run folder of each size's recommended (mode, rate), first seed (derived from the cell)."""
    first_seed = min(r["seed"] for r in records)
    keep = []
    for rec in result["summary"]["recommendation"]:
        for r in records:
            if (r["mode"], r["size"], r["lr"], r["seed"]) == (
                rec["recommended"],
                rec["size"],
                rec["lr"],
                first_seed,
            ):
                keep.append(cell_dir(root, Cell.parse(r["cell"])))
    return keep


def keep_recommended_models(
    result: dict[str, Any], records: list[dict[str, Any]], root: Path, keep_all: bool
) -> list[Path]:
    """Deletes the trained models of the runs not recommended (unless ``keep_all``); writes the study's
    table into the recommended runs' model cards. Returns the recommended runs' ``final/`` folders.

    Every folder deleted or rewritten is a cell's run folder under ``root`` (``cell_dir``): derived from
    the cell, never a path read from a trial record (which another worker, or anyone who can write to a
    shared storage, wrote)."""
    keep = recommended_dirs(result, records, root)
    if not keep_all:
        for r in records:
            run_dir = cell_dir(root, Cell.parse(r["cell"]))
            if run_dir not in keep:
                shutil.rmtree(run_dir / "final", ignore_errors=True)
    finals = []
    for run_dir in keep:
        final = run_dir / "final"
        if (final / CONFIG_NAME).is_file():
            rewrite_card(final, study=result)
            finals.append(final)
    return finals


def write_report(result: dict[str, Any], records: list[dict[str, Any]], folder: Path, keep_all: bool) -> None:
    """Writes ``study.json`` (each record with its run folder, derived from its cell), ``study.md`` and the
    plots to ``folder`` (``train.output_dir``), and keeps only the recommended runs' models."""
    folder.mkdir(parents=True, exist_ok=True)
    finals = keep_recommended_models(result, records, folder, keep_all)
    result["recommended_models"] = [str(p) for p in finals]
    shown = [{**r, "run_dir": str(cell_dir(folder, Cell.parse(r["cell"])))} for r in records]
    (folder / "study.json").write_text(json.dumps({**result, "records": shown}, indent=2))
    (folder / "study.md").write_text(study_markdown(result))
    plot_study(result, folder)
