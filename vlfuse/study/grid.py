"""The study's grid: one cell per (mode, train size, seed, learning rate), and the run config of a cell."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlfuse.compare import mode_config
from vlfuse.config import merge_config
from vlfuse.data.subsets import HOLDOUT
from vlfuse.schema import COMPARE_MODES, Config, ConfigError, top_only
from vlfuse.study.labels import mode_of
from vlfuse.study.stats import choose_rates
from vlfuse.tasks import get_task
from vlfuse.training.data import eval_splits

# The default grid: factors of the config's rate (train.lr for the head of a frozen study, train.encoder_lr
# for tuned encoders). LoRA's adapters start at zero and want larger rates than full fine-tuning.
DEFAULT_LR_FACTORS = {"none": (0.3, 1.0, 3.0), "lora": (3.0, 10.0, 30.0)}
OTHER_LR_FACTORS = (0.3, 1.0, 3.0)


ENCODERS_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a study.encoders pair's name: part of keys and folders


@dataclass(frozen=True)
class Cell:
    """One trial of the study: a mode, a train size (as configured), a seed and a learning rate, and with
    ``study.encoders`` the name of its pair of towers."""

    mode: str
    size: float
    seed: int
    lr: float
    encoders: str = ""

    @property
    def label(self) -> str:
        """What the report compares: the mode, or ``<encoders>/<mode>``."""
        return f"{self.encoders}/{self.mode}" if self.encoders else self.mode

    @property
    def key(self) -> str:
        """The cell as a string (``[encoders/]mode|size|seed|lr``), the trial's ``cell`` attribute."""
        return f"{self.label}|{self.size:g}|{self.seed}|{self.lr:.6g}"

    @classmethod
    def parse(cls, key: str) -> Cell:
        """The cell of a key (``[encoders/]mode|size|seed|lr``).

        Raises:
            ValueError: not a key of a known mode with finite numbers and a plain pair name (a key read
                from a shared storage is checked before it names a folder).
        """
        label, size, seed, lr = str(key).split("|")
        encoders, _, mode = label.rpartition("/")
        cell = cls(mode, float(size), int(seed), float(lr), encoders)
        plain = not encoders or ENCODERS_NAME.match(encoders)
        if (
            mode not in COMPARE_MODES
            or not plain
            or not (math.isfinite(cell.size) and math.isfinite(cell.lr))
        ):
            raise ValueError(f"not a study cell: {key!r}")
        return cell

    @property
    def folder(self) -> str:
        return f"{self.label}/size_{self.size:g}/lr_{self.lr:.6g}/seed_{self.seed}"


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
    """Every cell of the study, in a fixed order (encoders, mode, size, rate, seed)."""
    grid = lr_grid(cfg)
    return [
        Cell(mode, float(size), int(seed), lr, encoders)
        for encoders in (list(cfg.study.encoders) or [""])
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
    if cell.encoders:
        run = with_encoders(run, cell.encoders, cfg.study.encoders[cell.encoders])
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
    # a frozen tower, or the frozen prefix of a tower that trains its last blocks: the cache serves it
    frozen = run.model.trainable_encoders != "all" or top_only(run.model)
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
    for (label, size), choice in choose_rates(records).items():
        mode, encoders = mode_of(label), label.rpartition("/")[0]
        mine = [(label, float(size), seed, lr) for lr in configured.get(mode, []) for seed in cfg.study.seeds]
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
        new += [Cell(mode, float(size), seed, rate, encoders) for seed in cfg.study.seeds]
    return new


def with_encoders(run: Config, name: str, pair: dict[str, Any]) -> Config:
    """``run`` with the towers of the ``study.encoders`` pair ``name`` (its ``image_encoder`` and
    ``text_encoder`` sections merged over the config's, as a config file's would be: a tower named anew
    drops the other tower's ``kwargs``/``config_overrides``).

    Raises:
        ConfigError: a pair that is not sections of those two towers, or a key or value they refuse,
            naming ``study.encoders.<name>``.
    """
    towers = {"image_encoder", "text_encoder"}
    if (
        not isinstance(pair, dict)
        or not pair
        or set(pair) - towers
        or not all(isinstance(v, dict) for v in pair.values())
    ):
        raise ConfigError(
            f"study.encoders.{name} must map image_encoder and/or text_encoder to their settings, e.g. "
            "{image_encoder: {name: mobilenetv2_100, checkpoint: m.safetensors}}; got "
            f"{sorted(pair) if isinstance(pair, dict) else pair!r}"
        )
    overrides = [
        f"model.{tower}.{key}="
        + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        for tower, section in pair.items()
        for key, value in (section or {}).items()
    ]
    try:
        return merge_config(overrides=overrides, base=run)
    except ConfigError as err:
        raise ConfigError(f"study.encoders.{name}: {err}") from None
