"""Fair budgets (``study.budget``): what every trial of a study gets, stated and enforced.

- ``steps``: the same ``train.max_steps`` for every mode and size. A config that trains by ``train.epochs``
  is converted, before anything trains, to the steps of that many epochs of the whole train pool (the
  train split less the held-out rows, at ``train.batch_size``), and the conversion is said: an
  epoch-based config would otherwise train more steps on larger subsets.
- ``epochs``: ``train.epochs`` of each trial's own subset (larger sizes train longer; said as such).
- ``samples``: ``study.budget_samples`` training examples for every trial: ``train.max_steps`` becomes
  ``ceil(samples / train.batch_size)`` (a config's own ``max_steps`` or ``epochs`` is overridden, and said).
- ``seconds``: ``study.budget_seconds`` of training compute for every trial (data loading and steps;
  evaluation and saving excluded). Each mode's time per step is measured once by a calibration run of
  ``study.calibration_steps`` steps (its first rate and seed at the largest size, run as its trials are:
  in the worker's process or through ``study.launch``), and every trial of that mode trains
  ``budget_seconds / seconds_per_step`` steps, so the learning-rate schedule runs its whole course and a
  faster mode (frozen towers, a feature cache) trains more steps. The calibrations are recorded in the
  study, so every worker trains the same steps.
- ``flops``: ``study.budget_flops`` training FLOPs for every trial. Each mode's FLOPs per step are counted
  once on one batch (``vlfuse.training.speed.train_step_flops``: forward of every tower, backward of what
  trains), and every trial of the mode trains ``budget_flops / flops_per_step`` steps. Unlike seconds it
  does not depend on the machine; a feature cache's saving is not counted (the frozen towers' forward
  counts every step, as without the cache), so ``seconds`` is the budget that rewards it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlfuse.data.subsets import row_count
from vlfuse.schema import Config, ConfigError
from vlfuse.study.grid import Cell, trial_config
from vlfuse.tasks.base import load_task_split
from vlfuse.training.speed import train_step_flops


def steps_budget(cfg: Config) -> str:
    """Applies ``study.budget`` ``steps`` or ``epochs`` to ``cfg`` (converting an epoch-based config to
    steps) and describes it.

    Raises:
        ConfigError: ``epochs`` with ``train.max_steps`` set (it would win over the epochs), or a mixed
            (``data.datasets``) config to convert (give ``train.max_steps``).
    """
    train = cfg.train
    if cfg.study.budget == "epochs":
        if train.max_steps is not None:
            raise ConfigError(
                "study.budget=epochs trains train.epochs of each subset, but train.max_steps is set (it "
                "would win): set train.max_steps=null, or use study.budget=steps"
            )
        return (
            f"{train.epochs} epoch(s) of each trial's own subset at batch {train.batch_size} (larger sizes "
            "train longer)"
        )
    if cfg.study.budget == "samples":
        samples = cfg.study.budget_samples
        steps = math.ceil(samples / train.batch_size)
        if train.max_steps not in (None, steps):
            print(f"study.budget=samples: train.max_steps={train.max_steps} is replaced by {steps}")
        train.max_steps = steps
        return f"{samples:,} training samples for every trial ({steps} steps of batch {train.batch_size})"
    if cfg.study.budget != "steps":
        return ""
    if train.max_steps is None:
        if cfg.data.datasets:
            raise ConfigError(
                "study.budget=steps with data.datasets needs train.max_steps (the steps of every trial)"
            )
        rows = len(load_task_split(cfg, cfg.data.train_split, train=True))
        held = (
            row_count(cfg.study.validation, rows, "study.validation") if not cfg.study.validation_split else 0
        )
        per_epoch = math.ceil((rows - held) / train.batch_size)
        train.max_steps = train.epochs * per_epoch
        print(
            f"study.budget=steps: train.epochs={train.epochs} becomes train.max_steps={train.max_steps} for "
            f"every trial ({train.epochs} epoch(s) of the {rows - held:,}-row train pool at batch "
            f"{train.batch_size})"
        )
    return f"{train.max_steps} steps of batch {train.batch_size} for every mode and size"


def seconds_budget(
    cfg: Config, study: Any, grid: list[Cell], train_cell: Callable[[Config, Path], dict[str, Any]]
) -> dict[str, int]:
    """``study.budget=seconds``: each mode's steps, from its calibration (run now for a mode the study
    has not calibrated yet, with ``train_cell(run_cfg, run_dir)``, and recorded in the study)."""
    recorded: dict[str, Any] = dict(study.user_attrs.get("calibration", {}))
    for mode in dict.fromkeys(c.label for c in grid):  # each pair of towers and mode: its own speed
        if mode in recorded:
            continue
        folder = Path(cfg.train.output_dir) / "calibration" / mode
        shutil.rmtree(folder, ignore_errors=True)
        first = next(c for c in grid if c.label == mode)  # a step costs the same at any size
        run_cfg = trial_config(cfg, first, folder)
        run_cfg.train.max_steps = cfg.study.calibration_steps
        train_cell(run_cfg, folder)
        summary = json.loads((folder / "summary.json").read_text())
        per_step = (summary["time_data_s"] + summary["time_step_s"]) / max(1, summary["steps"])
        recorded[mode] = {
            "seconds_per_step": per_step,
            "steps": max(1, int(cfg.study.budget_seconds / per_step)),
        }
        print(
            f"study.budget=seconds: {mode} takes {per_step:.3f} s per step ({summary['steps']} calibration "
            f"steps): {recorded[mode]['steps']} steps per trial for {cfg.study.budget_seconds:g} s"
        )
        shutil.rmtree(folder, ignore_errors=True)
        study.set_user_attr("calibration", {**study.user_attrs.get("calibration", {}), mode: recorded[mode]})
    return {mode: int(entry["steps"]) for mode, entry in recorded.items()}


def flops_budget(cfg: Config, study: Any, grid: list[Cell]) -> dict[str, int]:
    """``study.budget=flops``: each mode's steps, from its FLOPs per step (counted now for a mode the
    study has not counted yet, and recorded in the study)."""
    recorded: dict[str, Any] = dict(study.user_attrs.get("flops", {}))
    for mode in dict.fromkeys(c.label for c in grid):
        if mode in recorded:
            continue
        first = next(c for c in grid if c.label == mode)
        run_cfg = trial_config(cfg, first, Path(cfg.train.output_dir) / "calibration" / mode)
        per_step = train_step_flops(run_cfg)
        steps = max(1, int(cfg.study.budget_flops // per_step))
        recorded[mode] = {"flops_per_step": per_step, "steps": steps}
        print(
            f"study.budget=flops: {mode} costs {per_step:.3g} FLOPs per step (batch "
            f"{cfg.train.batch_size}): {recorded[mode]['steps']} steps per trial for "
            f"{cfg.study.budget_flops:.3g} FLOPs"
        )
        study.set_user_attr("flops", {**study.user_attrs.get("flops", {}), mode: recorded[mode]})
    return {mode: int(entry["steps"]) for mode, entry in recorded.items()}
