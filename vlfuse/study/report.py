"""The study's report: ``study.json``, ``study.md`` (``vlfuse.study.text``), the plots, and the table in
the recommended runs' model cards."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from vlfuse.compare import rewrite_card
from vlfuse.hub import CONFIG_NAME
from vlfuse.study.grid import Cell, cell_dir
from vlfuse.study.pareto import plot_pareto
from vlfuse.study.stats import choose_rates
from vlfuse.study.text import COST_COLUMNS, study_markdown


def plot_study(result: dict[str, Any], folder: Path) -> list[Path]:
    """``study_curves.png`` (left: the report split's mean against train rows per mode with its confidence
    band; right: the selection split's values over seeds with each mode's fitted learning curve and its
    band, the extrapolated part shaded) and ``study_cost.png`` (each mode's costs at every size)."""
    from matplotlib.figure import Figure  # slow to import; only the plots need it

    rows = result["summary"]["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in sorted(rows, key=lambda r: r["mode"])))
    fig = Figure(figsize=(12, 4.2), dpi=120)
    measured, fitted = fig.subplots(1, 2)
    curves = result["summary"]["curves"]["modes"]
    for k, mode in enumerate(modes):
        colour = f"C{k}"
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["train_rows"])
        x = [r["train_rows"] for r in mine]
        measured.plot(x, [r["mean"] for r in mine], marker="o", label=mode, color=colour)
        measured.fill_between(x, [r["low"] for r in mine], [r["high"] for r in mine], alpha=0.2, color=colour)
        for r in mine:
            values = [v for v in r["selection_values"] if v is not None and math.isfinite(v)]
            fitted.scatter([r["train_rows"]] * len(values), values, s=12, color=colour)
        curve = curves.get(mode)
        if curve:
            fitted.plot(curve["grid_rows"], curve["mean"], color=colour, label=f"{mode} ({curve['model']})")
            if curve["low"]:
                fitted.fill_between(curve["grid_rows"], curve["low"], curve["high"], alpha=0.15, color=colour)
    largest = max(r["train_rows"] for r in rows)
    fitted.axvspan(largest, fitted.get_xlim()[1], color="grey", alpha=0.1, label="extrapolated")
    for ax in (measured, fitted):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.set_xlabel("train rows")
        ax.legend(title="mode", fontsize=8)
    measured.set_ylabel(f"{result['metric']} ({result['report_split']})")
    measured.set_title(f"measured: mean over seeds, {result['confidence']:.0%} CI band", fontsize=10)
    fitted.set_ylabel(f"{result['metric']} ({result['selection_split']})")
    fitted.set_title("learning curves (fitted to the selection split) and their extrapolation", fontsize=10)
    fig.suptitle(result["task"], fontsize=10)
    fig.tight_layout()
    curves_png = folder / "study_curves.png"
    fig.savefig(curves_png)

    fig = Figure(figsize=(14, 2.9), dpi=120)
    axes = fig.subplots(1, len(COST_COLUMNS))
    for ax, (key, label) in zip(axes, COST_COLUMNS.items()):
        for k, mode in enumerate(modes):
            mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["train_rows"])
            values = [r["cost"].get(key, float("nan")) for r in mine]
            values = [v / 2**20 if key == "final_bytes" else v for v in values]
            ax.plot([r["train_rows"] for r in mine], values, marker="o", color=f"C{k}", label=mode)
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(title="mode", fontsize=7)
    fig.supxlabel("train rows", fontsize=9)
    fig.suptitle("cost per mode at every train size (the chosen rate, mean over seeds)", fontsize=10)
    fig.tight_layout()
    cost = folder / "study_cost.png"
    fig.savefig(cost)
    return [curves_png, cost]


def recommended_dirs(result: dict[str, Any], records: list[dict[str, Any]], root: Path) -> list[Path]:
    """The run folder of each size's recommended (mode, rate), first seed (derived from the cell); for an
    undecided size, the cheapest mode shown equivalent so far (``provisional``)."""
    first_seed = min(r["seed"] for r in records)
    keep = []
    for rec in result["summary"]["decisions"]:
        for r in records:
            if (r["mode"], r["size"], r["lr"], r["seed"]) == (
                rec.get("provisional"),
                rec["size"],
                rec.get("lr"),
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


def drop_lost_rates(records: list[dict[str, Any]], grid: list[Cell], root: Path) -> list[Path]:
    """Deletes the ``final/`` of each run that can no longer be recommended, while the study runs: once
    every cell of a (mode, size) has finished, the runs at rates other than its chosen one (rates added
    later by ``study.extend_grid`` can only take the choice from the chosen rate, never give it to
    another). Returns the run folders whose ``final/`` was deleted (derived from cells, as in the report).
    """
    finished = {r["cell"] for r in records}
    groups: dict[tuple[str, float], list[Cell]] = {}
    for cell in grid:
        groups.setdefault((cell.label, cell.size), []).append(cell)
    complete = {g for g, members in groups.items() if all(c.key in finished for c in members)}
    chosen = choose_rates([r for r in records if (r["mode"], r["size"]) in complete])
    dropped = []
    for group in complete:
        for cell in groups[group]:
            run_dir = cell_dir(root, cell)
            if cell.lr != chosen[group]["lr"] and (run_dir / "final").is_dir():
                shutil.rmtree(run_dir / "final", ignore_errors=True)
                dropped.append(run_dir)
    return dropped


def write_report(result: dict[str, Any], records: list[dict[str, Any]], folder: Path, keep_all: bool) -> None:
    """Writes ``study.json`` (each record with its run folder, derived from its cell), ``study.md`` and the
    plots to ``folder`` (``train.output_dir``); once nothing is left to run, keeps only the recommended
    runs' models (a partial report deletes nothing: what is recommended may still change)."""
    folder.mkdir(parents=True, exist_ok=True)
    finals = keep_recommended_models(result, records, folder, keep_all or not result["complete"])
    result["recommended_models"] = [str(p) for p in finals]
    shown = [{**r, "run_dir": str(cell_dir(folder, Cell.parse(r["cell"])))} for r in records]
    (folder / "study.json").write_text(json.dumps({**result, "records": shown}, indent=2))
    (folder / "study.md").write_text(study_markdown(result))
    plot_study(result, folder)
    plot_pareto(result, folder)
