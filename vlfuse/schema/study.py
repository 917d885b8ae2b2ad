"""The sections of the commands that train many runs: ``compare`` (``recipes/compare.py``) and ``study``
(``recipes/study.py``), and their checks beyond one key's range."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vlfuse.schema.fields import COMPARE_MODES, ConfigError, at_least, one_of

# What every trial of a study gets (study.budget).
BUDGETS = ("steps", "epochs", "samples", "seconds", "flops")
# What "cheapest" means in the recommendation (study.cost).
COSTS = ("time", "memory", "inference", "params")


@dataclass
class CompareConfig:
    # recipes/compare.py: the runs to train side by side (same data, head, budget): trainable_encoders
    # values (none, image, text, all; each tower learns as its tuning says), or lora / last_blocks (both
    # towers trainable, both with that tuning).
    modes: list[str] = field(default_factory=lambda: ["none", "image", "text", "all"])
    # The metric to plot against wall time (default: the task's primary metric).
    metric: str | None = None


@dataclass
class StudyConfig:
    # recipes/study.py: the modes to study (as compare.modes: trainable_encoders values, lora, last_blocks).
    modes: list[str] = field(default_factory=lambda: ["none", "lora", "all"])
    # Train set sizes: row counts, or fractions (at most 1) of the train split's rows left after the
    # validation rows. Nested: a smaller set is part of every larger one (data.subset_seed orders the rows).
    train_sizes: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    # Candidate towers, an axis of the grid like modes: named pairs, each {image_encoder: {...},
    # text_encoder: {...}} overriding model.image_encoder / model.text_encoder (either may be left out),
    # e.g. {mnv2: {image_encoder: {name: mobilenetv2_100}}, lite0: {image_encoder: {name:
    # efficientnet_lite0}}}. The report compares (pair, mode) as <pair>/<mode>. Empty: the config's towers.
    encoders: dict[str, Any] = field(default_factory=dict)
    # One run per seed (train.seed) for every mode, size and learning rate.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Learning rates to try, per mode: the head's (train.lr) for none, the encoders' (train.encoder_lr) for
    # the others. A mode not named gets three rates around the config's: x0.3, x1, x3 (x3, x10, x30 of
    # train.encoder_lr for lora, whose adapters want larger rates).
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    # What every trial gets: steps (train.max_steps for every mode and size; a config that trains by
    # train.epochs is converted to the steps of that many epochs of the whole train pool, and says so),
    # epochs (train.epochs of its own subset: larger sizes train longer), samples (study.budget_samples
    # training examples each), seconds (study.budget_seconds of training compute each; every mode trains as
    # many steps as fit, measured by one calibration run per mode, so a faster mode trains more steps) or
    # flops (study.budget_flops each: a mode's FLOPs per step counted once, as many steps as fit).
    budget: str = one_of("steps", BUDGETS)
    # study.budget=samples: the training examples every trial sees (steps = samples / train.batch_size).
    budget_samples: int | None = field(default=None, metadata={"min": 1})
    # study.budget=seconds: the training compute time (data loading and steps; evaluation and saving
    # excluded) every trial gets.
    budget_seconds: float | None = field(default=None, metadata={"min": 0})
    # study.budget=flops: the training FLOPs every trial gets (torch.utils.flop_counter: forward of every
    # tower, backward of what trains; a frozen tower's forward counts even when a feature cache skips it).
    budget_flops: float | None = field(default=None, metadata={"min": 0})
    # study.budget=seconds: the steps of each mode's calibration run (its time per step sets its steps).
    calibration_steps: int = at_least(20, 2)
    # What "cheapest" means when the study recommends the cheapest mode as good as the best: time
    # (training compute per trial, evaluation and saving excluded), memory (peak), inference (ms per
    # example) or params (trainable parameters).
    cost: str = one_of("time", COSTS)
    # Read each trial at its evaluation with the best selection metric (over train.eval_every's
    # evaluations), not at its last step: small sets over-fit. The report split is evaluated at the same
    # evaluations and read at that step.
    best_step: bool = True
    # When a (mode, size)'s chosen rate is the highest or lowest it tried, run the next rate beyond it (x3 or
    # /3) for every seed, until the choice is inside the rates tried or extend_limit rates were added.
    extend_grid: bool = False
    # How many rates extend_grid may add beyond each end of a (mode, size)'s grid.
    extend_limit: int = at_least(2, 0)
    # Rows of the train split held out to choose the learning rate on (a count, or a fraction of at most 1;
    # evaluated as the split "holdout"). Ignored with validation_split.
    validation: float = field(default=0.1, metadata={"min": 0})
    # A split to choose the learning rate on instead of held-out train rows (e.g. validation).
    validation_split: str | None = None
    # The metric rates are chosen and modes compared on (default: the task's primary metric).
    metric: str | None = None
    # Where trials are recorded: an SQLAlchemy URL; null = sqlite:///<train.output_dir>/study.db. A
    # postgresql://user@host/db URL lets workers on many machines run the same command and split the grid.
    storage: str | None = None
    # The study's name in the storage; null = the name of train.output_dir's folder.
    name: str | None = None
    # Run each trial in processes of its own through this command, e.g. "accelerate launch --config_file
    # recipes/configs/accelerate/multi_gpu.yaml" (it gets "-m vlfuse.study.trial <run config>"); null = in
    # this process.
    launch: str | None = None
    # Keep every trial's trained model (final/); otherwise only the recommended runs keep theirs.
    keep_models: bool = False
    # Frozen towers' features are computed once and shared by every trial that freezes them.
    cache_features: bool = True
    # Stop a trial early whose metric on the selection split, at an evaluation during training
    # (train.eval_every), is behind another rate's finished trial of the same mode, size and seed at that
    # step by more than prune_margin (an Optuna pruner); its rate is then never chosen.
    prune: bool = False
    # How far behind (in the study's metric) a trial may be before study.prune stops it.
    prune_margin: float = field(default=0.05, metadata={"min": 0})
    # Confidence level of the intervals, and the probability a decision needs: a mode is practically
    # equivalent to the best (or worse) when the posterior gives it at least this probability.
    confidence: float = field(default=0.95, metadata={"min": 0.5})
    # Region of practical equivalence, in the metric's units: two modes whose mean difference is within
    # +-rope are as good as each other for practical purposes (0.01: one point of accuracy).
    rope: float = field(default=0.01, metadata={"min": 0})
    # true: every seed trains on the same rows of each size (data.subset_seed), so the intervals measure
    # the optimiser's noise only; false: each seed draws its own rows too (the variance a user meets).
    shared_subsets: bool = False
    # A metric value to reach: the report estimates the train rows each mode needs for it from its
    # learning curve (an extrapolation beyond the largest size). null: none.
    target: float | None = None
    # Seconds between a running trial's heartbeats (written to the storage).
    heartbeat_interval: int = at_least(30, 1)
    # A trial with no heartbeat for this many seconds (its worker died) is failed and queued again.
    grace_period: int = at_least(120, 1)
    # How many times a failed cell (an error, a dead worker, a timeout) is run again; after that it is
    # reported as failed and the study completes without it.
    max_retries: int = at_least(2, 0)
    # Seconds a trial may run; one running longer is ended (a launched trial's processes too) and counted
    # as a failure. null: no limit.
    trial_timeout: int | None = field(default=None, metadata={"min": 1})


def validate_compare(cfg: CompareConfig) -> None:
    bad = [m for m in cfg.modes if m not in COMPARE_MODES]
    if bad or not cfg.modes or len(set(cfg.modes)) != len(cfg.modes):
        raise ConfigError(
            f"invalid value {cfg.modes!r} for 'compare.modes'; allowed: distinct values of "
            f"{', '.join(COMPARE_MODES)}"
        )


def validate_study(cfg: StudyConfig) -> None:
    bad = [m for m in [*cfg.modes, *cfg.lr_grid] if m not in COMPARE_MODES]
    if bad or not cfg.modes or len(set(cfg.modes)) != len(cfg.modes):
        raise ConfigError(
            f"invalid value {cfg.modes!r} for 'study.modes' (or a key of study.lr_grid); allowed: distinct "
            f"values of {', '.join(COMPARE_MODES)}"
        )
    for key, values in (("train_sizes", cfg.train_sizes), ("seeds", cfg.seeds)):
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"invalid value {values!r} for 'study.{key}'; needs distinct values")
    if any(size <= 0 for size in cfg.train_sizes):
        raise ConfigError(f"invalid value {cfg.train_sizes!r} for 'study.train_sizes'; sizes must be > 0")
    for mode, rates in cfg.lr_grid.items():
        if not rates or any(not isinstance(r, int | float) or r <= 0 for r in rates):
            raise ConfigError(f"invalid value {rates!r} for 'study.lr_grid.{mode}'; needs rates > 0")
    bad = [name for name in cfg.encoders if not re.match(r"^[A-Za-z0-9_.-]+$", str(name))]
    if bad:
        raise ConfigError(
            f"invalid name {bad[0]!r} in 'study.encoders': pair names are letters, digits, '_', '.', '-'"
        )
    needs = {"seconds": "budget_seconds", "samples": "budget_samples", "flops": "budget_flops"}
    if cfg.budget in needs and not getattr(cfg, needs[cfg.budget]):
        raise ConfigError(
            f"study.budget={cfg.budget} needs study.{needs[cfg.budget]} (what every trial gets)"
        )
    if not cfg.confidence < 1:
        raise ConfigError(f"invalid value {cfg.confidence!r} for 'study.confidence'; must be < 1")
