"""Parts of the train split by rows: a held-out part for choosing settings (``data.holdout``, evaluated as
the split named ``holdout``) and a random training subset (``data.train_subset``), both drawn from one
seeded order of the rows (``data.subset_seed``).

The order is drawn once per (row count, seed): the held-out rows are its first ones and a training subset
takes the next ones, so a smaller subset is part of every larger one (nested) and no held-out row is ever
trained on. Rows, not examples, are drawn: the texts of one row (several expressions or captions of one
image) stay on one side.

The parts are views (``RowView``) over the dataset of the whole split, taken after the feature cache:
every part and every size reads the one cache of the whole split, computed once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vlfuse.schema import ConfigError, DataConfig

HOLDOUT = "holdout"  # the evaluation split name of the held-out rows (with data.holdout set)


def row_count(value: float, available: int, key: str) -> int:
    """A count (``value > 1``, a whole number) or a fraction of ``available`` (``0 < value <= 1``; 1 is
    all of them).

    Raises:
        ConfigError: naming ``key``, for a count that is not whole or is more than ``available``.
    """
    if value <= 1:
        return max(1, round(value * available))
    if value != int(value):
        raise ConfigError(f"invalid value {value!r} for '{key}'; a row count must be a whole number")
    if value > available:
        raise ConfigError(
            f"invalid value {value!r} for '{key}'; the split has {available:,} rows to draw from"
        )
    return int(value)


def split_rows(cfg: DataConfig, n_rows: int) -> dict[str, list[int]]:
    """The rows of each part of a train split of ``n_rows`` rows: ``holdout`` and ``train`` (sorted).

    Raises:
        ConfigError: for a part larger than the rows there are, or nothing left to train on.
    """
    order = np.random.default_rng(cfg.subset_seed).permutation(n_rows).tolist()
    held = row_count(cfg.holdout, n_rows, "data.holdout") if cfg.holdout else 0
    if held >= n_rows:
        raise ConfigError(f"data.holdout={cfg.holdout} leaves none of the train split's {n_rows:,} rows")
    pool = order[held:]
    if cfg.train_subset is not None:
        pool = pool[: row_count(cfg.train_subset, len(pool), "data.train_subset")]
    return {HOLDOUT: sorted(order[:held]), "train": sorted(pool)}


def example_rows(dataset: Any) -> tuple[int, list[int]]:
    """The rows of the split a dataset reads, and the row of each of its examples (an
    ``ImageTextDataset``, or a dataset over one such as the feature cache's, reached through ``base``)."""
    while not hasattr(dataset, "index"):
        dataset = dataset.base
    return len(dataset.ds), [row for row, _ in dataset.index]


class RowView(Dataset):
    """The examples of ``base`` (the dataset of a whole split, cached or not) whose rows are in ``rows``.

    It answers what the training loop, the collators and the datasets built over examples
    (``ImageCaptions``) ask of a split's dataset: length, items, texts, image ids, cached text features,
    counts and a description.
    """

    def __init__(self, base: Any, rows: list[int], part: str) -> None:
        n_rows, per_example = example_rows(base)
        keep = set(rows)
        self.base = base
        self.part = part
        self.positions = [i for i, row in enumerate(per_example) if row in keep]
        self.texts = [base.texts[i] for i in self.positions]
        self.image_ids = [base.image_ids[i] for i in self.positions]
        self.image_size = base.image_size
        self.counts: Counter[str] = Counter(base.counts)
        self.counts["rows"], self.counts["examples"], self.counts["split_rows"] = len(keep), len(self), n_rows

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.positions[i]]

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def text_features(self, i: int) -> Any:
        return self.base.text_features(self.positions[i])

    def blank_features(self) -> Any:
        return self.base.blank_features()

    def describe(self) -> str:
        c = self.counts
        return (
            f"{self.part} part: {c['rows']:,} of {c['split_rows']:,} rows -> {len(self):,} examples "
            f"(the whole split: {self.base.describe()})"
        )
