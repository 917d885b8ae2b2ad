"""Which mode for my data? A study of modes x train sizes x seeds, each mode's learning rate tuned on a
validation split, with confidence intervals and a recommendation (``recipes/study.py``).

Every (mode, size, seed, rate) is an Optuna trial of a grid in a study storage (``vlfuse.study.engine``):
SQLite in ``train.output_dir`` by default, or ``study.storage=postgresql://...`` for workers on many
machines running the same command. Running the command again continues the study; once every cell is
finished it only rewrites the report (``vlfuse.study.report``). The statistics are
``vlfuse.study.stats``'s; the cells and their run configs ``vlfuse.study.grid``'s.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from vlfuse.data.feature_cache import folder_size
from vlfuse.distributed import process_state
from vlfuse.schema import Config, ConfigError, shown_dict
from vlfuse.study.budget import flops_budget, seconds_budget, steps_budget
from vlfuse.study.engine import (
    StudyError,
    failed_cells,
    open_study,
    run_worker,
)
from vlfuse.study.grid import (
    Cell,
    cells,
    extension_cells,
    report_split,
    selection_split,
    study_metric,
    trial_config,
)
from vlfuse.study.records import finished_records
from vlfuse.study.report import drop_lost_rates, write_report
from vlfuse.study.stats import summarize
from vlfuse.study.storage import shown_url, storage_url
from vlfuse.study.trial import LaunchError, launch
from vlfuse.training import TrainingError, train

__all__ = ["LaunchError", "StudyError", "run_study"]


def run_study(cfg: Config) -> dict[str, Any]:
    """Runs this worker's share of the study's trials, then writes the report from every finished trial
    (this worker's and the others').

    Returns:
        The content of ``study.json`` (without the per-trial records).

    Raises:
        ConfigError: a setting the study cannot use (e.g. reporting on the split rates are chosen on).
        StudyError: the storage holds a study of that name with another grid.
    """
    if process_state().num_processes > 1:
        raise ConfigError(
            "recipes/study.py runs one trial at a time in its process: start it with python, once per "
            "worker (workers on one study.storage split the grid)"
        )
    report_split(cfg)  # refuses a report split that would choose rates, before anything trains
    if cfg.study.launch and cfg.study.prune:
        raise ConfigError(
            "study.prune=true needs the trials' evaluations in this process; with study.launch each trial "
            "runs in processes of its own: turn one off"
        )
    grid = cells(cfg)
    root = Path(cfg.train.output_dir)
    budget = steps_budget(cfg)  # before the study opens: a converted train.max_steps is part of its identity
    study = open_study(cfg, grid)
    first_seed = min(cfg.study.seeds)
    start = time.perf_counter()
    steps: dict[str, int] = {}
    if cfg.study.budget == "seconds":
        steps = seconds_budget(cfg, study, grid, train_run)
        budget = f"{cfg.study.budget_seconds:g} s of training compute per trial: "
    elif cfg.study.budget == "flops":
        steps = flops_budget(cfg, study, grid)
        budget = f"{cfg.study.budget_flops:.3g} training FLOPs per trial: "
    if steps:
        budget += ", ".join(f"{mode} {n} steps" for mode, n in steps.items())
    trained = run_grid(cfg, study, grid, first_seed, steps)
    records = finished_records(study, [c.key for c in grid])
    failed = failed_cells(study, [c.key for c in grid], cfg.study.max_retries)
    print(
        f"study {study.study_name!r} ({shown_url(storage_url(cfg))}): this worker trained {trained} "
        f"trial(s) in {time.perf_counter() - start:.0f} s; {len(records)} of {len(grid)} cells finished"
        + (f", {len(failed)} failed" if failed else "")
    )
    result = study_result(cfg, grid, records, failed, budget, steps)
    if records:
        write_report(result, records, root, cfg.study.keep_models)
    return result


def study_result(
    cfg: Config,
    grid: list[Cell],
    records: list[dict[str, Any]],
    failed: dict[str, str],
    budget: str,
    steps: dict[str, int],
) -> dict[str, Any]:
    """``study.json``'s content (without the per-trial records): the study's settings and its summary."""
    return {
        "task": cfg.model.task,
        "metric": study_metric(cfg),
        "selection_split": selection_split(cfg),
        "report_split": report_split(cfg),
        "confidence": cfg.study.confidence,
        "cells": [c.key for c in grid],
        "trials": len(records),
        # nothing left to run: every cell finished, or failed study.max_retries + 1 times
        "complete": len(records) + len(failed) == len(grid),
        "failed": failed,
        "config": {
            **shown_dict(cfg),
            "study": {**shown_dict(cfg)["study"], "storage": shown_url(storage_url(cfg))},
        },
        "variance_sources": variance_sources(cfg),
        "best_step": cfg.study.best_step,
        "budget": {"kind": cfg.study.budget, "description": budget, "steps": steps},
        "cost": cfg.study.cost,
        "summary": summarize(records, cfg.study.confidence, cfg.study.rope, cfg.study.target, cfg.study.cost),
    }


def run_grid(cfg: Config, study, grid: list[Cell], first_seed: int, steps: dict[str, int]) -> int:
    """This worker's trials of ``grid`` (and, with ``study.extend_grid``, of the cells beyond its edges
    that any worker added, which join ``grid``); returns how many it trained."""
    trained = 0
    while True:
        if cfg.study.extend_grid:  # the rates any worker added beyond the grid's edges
            known = {c.key for c in grid}
            grid.extend(Cell.parse(k) for k in study.user_attrs.get("extended", []) if k not in known)
        trained += run_worker(
            cfg,
            study,
            grid,
            lambda cell, run_dir, trial: run_kept(cfg, study, grid, cell, run_dir, first_seed, trial, steps),
        )
        new = extend_grid(cfg, study, grid) if cfg.study.extend_grid else []
        if not new:
            return trained
        print(
            f"study.extend_grid: {len(new)} cell(s) beyond the rates tried: {', '.join(c.key for c in new)}"
        )


def run_kept(
    cfg: Config, study, grid: list[Cell], cell: Cell, run_dir: Path, first_seed: int, trial, steps: dict
) -> dict[str, Any]:
    """``run_cell``; then, unless ``study.keep_models``, deletes the models that can no longer be
    recommended (``drop_lost_rates``): a study keeps a model only while it may still be chosen."""
    out = run_cell(cfg, cell, run_dir, first_seed, trial, steps.get(cell.label))
    if not cfg.study.keep_models:
        records = [*finished_records(study, [c.key for c in grid]), {**out, "cell": cell.key}]
        for dropped in drop_lost_rates(records, grid, Path(cfg.train.output_dir)):
            print(f"study: {dropped.name} can no longer be recommended: its final/ deleted")
    return out


def extend_grid(cfg: Config, study, grid: list[Cell]) -> list[Cell]:
    """The cells ``extension_cells`` adds to ``grid`` now (recorded in the study, so every worker runs
    and reports them)."""
    keys = {c.key for c in grid}
    new = [c for c in extension_cells(cfg, finished_records(study, list(keys))) if c.key not in keys]
    if new:
        study.set_user_attr("extended", study.user_attrs.get("extended", []) + [c.key for c in new])
        grid += new
    return new


def variance_sources(cfg: Config) -> dict[str, list[str]]:
    """What varies between a study's seeds, and what is held fixed (named in the report)."""
    varied = ["initialisation and data order (train.seed)"]
    fixed = [f"the rows rates and modes are chosen on ({selection_split(cfg)})", "the evaluation splits"]
    if cfg.study.shared_subsets:
        fixed.insert(0, "the training rows of each size (study.shared_subsets=true)")
    else:
        varied.insert(0, "the training rows drawn at each size below the whole split (nested within a seed)")
    return {"varied": varied, "fixed": fixed}


def train_run(run_cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Trains ``run_cfg`` as the study's trials train: through ``study.launch`` when set, else in this
    process; returns the last metrics per split."""
    if run_cfg.study.launch:
        return launch(run_cfg.study.launch, run_cfg, run_dir, run_cfg.study.trial_timeout)[0]
    return train(run_cfg)


def run_cell(
    cfg: Config, cell: Cell, run_dir: Path, first_seed: int, trial=None, max_steps: int | None = None
) -> dict[str, Any]:
    """Trains one cell and returns what the report needs: the selection and report metrics, the costs.

    A run that stops on NaN losses (a rate too large) is a result, not an error: its metrics are None.
    Each evaluation during training reports the selection metric to ``trial`` (Optuna); with
    ``study.prune`` the pruner may stop the run there (``pruned``: the step); it then has no selection
    metric (its rate counts as minus infinity).
    Its weights are deleted unless ``study.keep_models``, or it is a first-seed run (the candidates for
    the recommended models, pruned by the report).
    """
    run_cfg = trial_config(cfg, cell, run_dir)
    if max_steps is not None:  # study.budget=seconds or flops: the steps this mode's budget holds
        run_cfg.train.max_steps = max_steps
    metric, selection = study_metric(cfg), selection_split(cfg)
    print(f"study trial {cell.key} -> {run_dir}", flush=True)
    error, pruned = None, None

    def on_eval(step: int, metrics: dict[str, dict[str, float]]) -> bool:
        nonlocal pruned
        value = metrics.get(selection, {}).get(metric)
        if trial is None or value is None or not math.isfinite(value):
            return False
        trial.report(value, step)
        if cfg.study.prune and trial.should_prune():
            pruned = step
        return pruned is not None

    if cfg.study.launch:
        metrics, error = launch(cfg.study.launch, run_cfg, run_dir, cfg.study.trial_timeout)
    else:
        try:
            metrics = train(run_cfg, on_eval=on_eval)
        except TrainingError as err:
            metrics, error = {}, str(err)
    record = trial_record(cfg, cell, run_dir, metrics, error, pruned)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a trial is never resumed
    if not cfg.study.keep_models and cell.seed != first_seed:
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    return record


def trial_record(
    cfg: Config, cell: Cell, run_dir: Path, metrics: dict, error: str | None, pruned: int | None
) -> dict[str, Any]:
    """What the report keeps of a trial: its cell, its metrics on both splits, its costs.

    Raises:
        ConfigError: ``study.metric`` is not one of the task's metrics (naming the ones there are).
    """
    metric, selection, report = study_metric(cfg), selection_split(cfg), report_split(cfg)
    steps: dict[str, Any] = {}
    if cfg.study.best_step and pruned is None and metrics:
        best = best_evaluation(run_dir / "metrics.jsonl", metric, selection, report)
        if best is not None:
            metrics, steps = best.pop("metrics"), best
    for split in (selection, report):
        if metrics and metric not in metrics.get(split, {}):
            available = sorted(k for k in metrics.get(split, {}) if k not in ("step", "epoch", "split"))
            raise ConfigError(
                f"study.metric={metric!r} is not a metric of split {split!r}; it has {available}"
            )
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    final = run_dir / "final"
    cost = {
        "trainable": summary.get("trainable_parameters"),
        "wall_time_s": summary.get("wall_time_s"),
        # what training computes (data and steps), apart from evaluation and saving
        "train_time_s": _sum(summary.get("time_data_s"), summary.get("time_step_s")),
        "train_samples_per_s": summary.get("train_samples_per_s"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "inference_ms_per_example": _per_example_ms(metrics.get(report, {})),
        "final_bytes": folder_size(final) if final.is_dir() else None,
    }
    return {
        "cell": cell.key,
        "mode": cell.label,
        "encoders": cell.encoders,
        "size": cell.size,
        "seed": cell.seed,
        "lr": cell.lr,
        "train_rows": summary.get("train_rows"),
        "selection": None if pruned is not None else metrics.get(selection, {}).get(metric),
        **steps,
        # how many examples the selection metric counts (its resolution is one of them)
        "selection_count": _example_count(metrics.get(selection, {})),
        "pruned": pruned,
        "report": metrics.get(report, {}).get(metric),
        "report_metrics": metrics.get(report, {}),
        "error": error,
        "cost": {k: v for k, v in cost.items() if v is not None},
    }


def _example_count(metrics: dict[str, Any]) -> int | None:
    """The examples an evaluation counted (``count``; retrieval: its texts), if it says."""
    value = metrics.get("count", metrics.get("texts"))
    return int(value) if isinstance(value, int | float) and value > 0 else None


def best_evaluation(path: Path, metric: str, selection: str, report: str) -> dict[str, Any] | None:
    """``study.best_step``: of a run's evaluations (``metrics.jsonl``), the one with the best ``metric``
    on the selection split (the earliest of equals), with both splits' metrics at that step, the last
    evaluation's step and its selection value. The report split is evaluated at every evaluation (so it
    is read at the chosen step without keeping that step's weights) and chooses nothing. None when the
    run has no evaluation of both splits."""
    if not path.is_file():
        return None
    by_step: dict[int, dict[str, dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") in (selection, report) and row.get("step") is not None:
            by_step.setdefault(int(row["step"]), {})[row["split"]] = row
    scored = [
        (step, rows)
        for step, rows in sorted(by_step.items())
        if selection in rows and report in rows and _finite(rows[selection].get(metric))
    ]
    if not scored:
        return None
    step, rows = max(scored, key=lambda item: (item[1][selection][metric], -item[0]))
    last_step, last = scored[-1]
    return {
        "metrics": rows,
        "best_step": step,
        "last_step": last_step,
        "last_selection": last[selection][metric],
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _sum(*values: Any) -> float | None:
    return float(sum(values)) if all(isinstance(v, int | float) for v in values) else None


def _per_example_ms(metrics: dict[str, Any]) -> float | None:
    """Milliseconds per example of an evaluation: its time (both towers, the fusion and the head on every
    example, as inference runs them) over its examples."""
    seconds, count = metrics.get("time_s"), _example_count(metrics)
    return 1000.0 * seconds / count if isinstance(seconds, int | float) and count else None
