"""The study's grid: one cell per (mode, train size, seed, learning rate), and the run config of a cell."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlfuse.compare import mode_config
from vlfuse.data.subsets import HOLDOUT
from vlfuse.schema import COMPARE_MODES, Config, ConfigError
from vlfuse.study.stats import choose_rates
from vlfuse.tasks import get_task
from vlfuse.training.data import eval_splits

# The default grid: factors of the config's rate (train.lr for the head of a frozen study, train.encoder_lr
# for tuned encoders). LoRA's adapters start at zero and want larger rates than full fine-tuning.
DEFAULT_LR_FACTORS = {"none": (0.3, 1.0, 3.0), "lora": (3.0, 10.0, 30.0)}
OTHER_LR_FACTORS = (0.3, 1.0, 3.0)


@dataclass(frozen=True)
class Cell:
    """One trial of the study: a mode, a train size (as configured), a seed and a learning rate."""

    mode: str
    size: float
    seed: int
    lr: float

    @property
    def key(self) -> str:
        """The cell as Optuna's grid value (a string: the grid holds plain values)."""
        return f"{self.mode}|{self.size:g}|{self.seed}|{self.lr:.6g}"

    @classmethod
    def parse(cls, key: str) -> Cell:
        """The cell of a key (``mode|size|seed|lr``).

        Raises:
            ValueError: not a key of a known mode with finite numbers (a key read from a shared storage
                is checked before it names a folder).
        """
        mode, size, seed, lr = str(key).split("|")
        cell = cls(mode, float(size), int(seed), float(lr))
        if mode not in COMPARE_MODES or not (math.isfinite(cell.size) and math.isfinite(cell.lr)):
            raise ValueError(f"not a study cell: {key!r}")
        return cell

    @property
    def folder(self) -> str:
        return f"{self.mode}/size_{self.size:g}/lr_{self.lr:.6g}/seed_{self.seed}"


def cell_of(trial: Any) -> str | None:
    """The cell key of an Optuna trial: its user attribute ``cell`` (the parameter ``cell`` in studies
    whose grid Optuna's GridSampler handed out)."""
    return trial.user_attrs.get("cell") or trial.params.get("cell")


def cell_dir(root: Path, cell: Cell) -> Path:
    """The run folder of ``cell``: ``<train.output_dir>/trials/<mode>/size_<s>/lr_<r>/seed_<k>``, derived
    from the cell (never read from a trial record) and checked to lie inside ``root``.

    Raises:
        ValueError: the folder would lie outside ``root``.
    """
    base = (Path(root) / "trials").resolve()
    folder = (base / cell.folder).resolve()
    if not folder.is_relative_to(base):
        raise ValueError(f"the run folder of cell {cell.key!r} would lie outside {base}")
    return folder


def lr_key(mode: str) -> str:
    """The config key a mode's learning rate sets: the head's for ``none``, the encoders' otherwise."""
    return "train.lr" if mode == "none" else "train.encoder_lr"


def lr_grid(cfg: Config) -> dict[str, list[float]]:
    """The rates each mode tries: ``study.lr_grid``'s, or factors of the config's rate."""
    grid = {}
    for mode in cfg.study.modes:
        if mode in cfg.study.lr_grid:
            grid[mode] = [float(r) for r in cfg.study.lr_grid[mode]]
            continue
        base = cfg.train.lr if mode == "none" else cfg.train.encoder_lr
        factors = DEFAULT_LR_FACTORS.get(mode, OTHER_LR_FACTORS)
        grid[mode] = [float(f"{base * f:.3g}") for f in factors]
    return grid


def cells(cfg: Config) -> list[Cell]:
    """Every cell of the study, in a fixed order (mode, size, rate, seed)."""
    grid = lr_grid(cfg)
    return [
        Cell(mode, float(size), int(seed), lr)
        for mode in cfg.study.modes
        for size in cfg.study.train_sizes
        for lr in grid[mode]
        for seed in cfg.study.seeds
    ]


def selection_split(cfg: Config) -> str:
    """The split rates are chosen on: ``study.validation_split``, or the held-out train rows."""
    return cfg.study.validation_split or HOLDOUT


def report_split(cfg: Config) -> str:
    """The split the study reports: the first of ``data.eval_split``; never used to choose anything.

    Raises:
        ConfigError: if it is the split rates are chosen on.
    """
    split = eval_splits(cfg)[0]
    if split in (selection_split(cfg), HOLDOUT):
        raise ConfigError(
            f"data.eval_split={split!r} is the split the study chooses learning rates on; report on "
            "another (e.g. data.eval_split=validation) so that no reported number chose anything"
        )
    return split


def study_metric(cfg: Config) -> str:
    return cfg.study.metric or get_task(cfg.model.task).primary_metric


def trial_config(cfg: Config, cell: Cell, run_dir: Path) -> Config:
    """The run config of ``cell``: the mode's settings, the nested train subset, the seed and the rate; it
    evaluates the selection split and the report split only, at the end."""
    run = mode_config(cfg, cell.mode)  # a copy
    run.train.output_dir = str(run_dir)
    run.study.storage = None  # a run needs no storage (and its saved config must hold no password)
    run.train.seed = cell.seed
    run.train.resume_from = None
    run.train.checkpoint_every = None
    if cell.mode == "none":
        run.train.lr = cell.lr
    else:
        run.train.encoder_lr = cell.lr
    run.data.train_subset = cell.size
    # Each seed draws its own rows of every size (nested within the seed); the held-out rows stay fixed.
    run.data.train_subset_seed = None if cfg.study.shared_subsets else cell.seed
    if not cfg.study.validation_split:
        if not cfg.study.validation:
            raise ConfigError("study.validation=0 needs study.validation_split (a split to choose rates on)")
        run.data.holdout = cfg.study.validation
    run.data.eval_split = [selection_split(cfg), report_split(cfg)]
    served = get_task(cfg.model.task).feature_cache and cfg.data.hflip_prob == 0
    frozen = run.model.trainable_encoders != "all"  # a tower the cache can serve
    run.train.cache_features = frozen and (run.train.cache_features or (cfg.study.cache_features and served))
    return run


def extension_cells(cfg: Config, records: list[dict[str, Any]]) -> list[Cell]:
    """``study.extend_grid``: for each (mode, size) whose every configured cell finished and whose chosen
    rate (best mean on the selection split) is the highest or lowest tried, the next rate beyond it (x3 or
    /3, three significant digits) for every seed; at most ``study.extend_limit`` rates beyond each end of
    the configured ones. Nothing while the choice is inside the rates tried."""
    configured = lr_grid(cfg)
    finished = {(r["mode"], r["size"], r["seed"], r["lr"]) for r in records}
    new = []
    for (mode, size), choice in choose_rates(records).items():
        mine = [(mode, float(size), seed, lr) for lr in configured.get(mode, []) for seed in cfg.study.seeds]
        if choice["edge"] is None or not all(c in finished for c in mine):
            continue
        high = choice["edge"] == "highest"
        beyond = [
            lr
            for lr in choice["rates"]
            if (lr > max(configured[mode]) if high else lr < min(configured[mode]))
        ]
        if len(beyond) >= cfg.study.extend_limit:
            continue
        rate = float(f"{choice['lr'] * (3 if high else 1 / 3):.3g}")
        new += [Cell(mode, float(size), seed, rate) for seed in cfg.study.seeds]
    return new
