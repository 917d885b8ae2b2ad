"""Parts of the train split by rows: a held-out part for choosing settings (``data.holdout``, evaluated as
the split named ``holdout``) and a random training subset (``data.train_subset``).

Rows are drawn **by image**: the rows that show one image (the dataset's ``data.columns.image_id``, or
the same encoded image: the same file path or the same bytes) are one group, and a group is never split
between the parts, so no image of the held-out rows is ever trained on (RefCOCO-style data has one row
per expression or object, several per image). The groups are put in one seeded order
(``data.subset_seed``): the held-out rows are its first groups, fixed whatever the training subset. The
training subset takes the next groups in that order, or, with ``data.train_subset_seed``, in an order of
its own drawn from both seeds (the study draws one per seed, so that the rows a seed trains on are one of
the sources of variance it reports). Within one order, a smaller subset is part of every larger one
(nested). A part takes whole groups until it holds at least its row count.

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


def _take(groups_in_order: list[int], members: dict[int, list[int]], rows: int) -> list[int]:
    """The first groups of ``groups_in_order`` until they hold at least ``rows`` rows."""
    taken, count = [], 0
    for g in groups_in_order:
        if count >= rows:
            break
        taken.append(g)
        count += len(members[g])
    return taken


def split_rows(cfg: DataConfig, groups: list[Any] | int) -> dict[str, list[int]]:
    """The rows of each part of a train split: ``holdout`` and ``train`` (sorted).

    Args:
        groups: each row's group (its image; ``row_groups``), or a row count (every row its own group).

    Raises:
        ConfigError: for a part larger than the rows there are, or nothing left to train on.
    """
    keys = range(groups) if isinstance(groups, int) else groups
    ids: dict[Any, int] = {}
    members: dict[int, list[int]] = {}
    for row, key in enumerate(keys):
        members.setdefault(ids.setdefault(key, len(ids)), []).append(row)
    n_rows = sum(len(m) for m in members.values())
    order = np.random.default_rng(cfg.subset_seed).permutation(len(members)).tolist()
    held_rows = row_count(cfg.holdout, n_rows, "data.holdout") if cfg.holdout else 0
    held_groups = _take(order, members, held_rows)
    held = sorted(r for g in held_groups for r in members[g])
    if held and len(held) >= n_rows:
        raise ConfigError(f"data.holdout={cfg.holdout} leaves none of the train split's {n_rows:,} rows")
    pool = order[len(held_groups) :]
    if cfg.train_subset_seed is not None:  # the training subset's own order, drawn from both seeds
        pool = sorted(pool)
        pool = [
            pool[i]
            for i in np.random.default_rng([cfg.subset_seed, cfg.train_subset_seed]).permutation(len(pool))
        ]
    if cfg.train_subset is not None:
        pool = _take(pool, members, row_count(cfg.train_subset, n_rows - len(held), "data.train_subset"))
    return {HOLDOUT: held, "train": sorted(r for g in pool for r in members[g])}


def image_groups(ds: Any, cfg: DataConfig, image_column: str) -> list[Any]:
    """Each row's image as a group key: ``data.columns.image_id``'s value when given, else the encoded
    image (a file path, or a hash of the bytes); a row with neither is a group of its own. The image
    column is read as Arrow data (no image is decoded)."""
    import hashlib

    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if "image_id" in cfg.columns and cfg.columns["image_id"] in ds.column_names:
        return list(ds[cfg.columns["image_id"]])
    feature = ds.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    keys: list[Any] = []
    for batch in ds.select_columns([image_column]).with_format("arrow").iter(batch_size=1024):
        cells = batch.column(image_column)
        if pa.types.is_struct(cells.type):
            data, paths = (
                pc.struct_field(cells, "bytes").to_pylist(),
                pc.struct_field(cells, "path").to_pylist(),
            )
        else:
            values = cells.to_pylist()
            data = [v if isinstance(v, bytes | bytearray) else None for v in values]
            paths = [v if isinstance(v, str) else None for v in values]
        for blob, path in zip(data, paths):
            if blob:
                keys.append(("bytes", hashlib.blake2b(blob, digest_size=16).digest()))
            elif path:
                keys.append(("path", path))
            else:
                keys.append(("row", len(keys)))
    return keys


def example_rows(dataset: Any) -> tuple[int, list[int]]:
    """The rows of the split a dataset reads, and the row of each of its examples (an
    ``ImageTextDataset``, or a dataset over one such as the feature cache's, reached through ``base``)."""
    while not hasattr(dataset, "index"):
        dataset = dataset.base
    return len(dataset.ds), [row for row, _ in dataset.index]


def row_groups(dataset: Any) -> list[Any]:
    """``image_groups`` of the split a dataset reads (an ``ImageTextDataset``, or one over it such as the
    feature cache's, reached through ``base``), computed once per dataset."""
    while not hasattr(dataset, "index"):
        dataset = dataset.base
    if getattr(dataset, "row_groups", None) is None:
        if "image_id" in dataset.cfg.columns:  # the dataset's own image ids (its per-row column is gone)
            keys: list[Any] = [("row", r) for r in range(len(dataset.ds))]
            for (row, _), image in zip(dataset.index, dataset.image_ids):
                keys[row] = ("id", image)
            dataset.row_groups = keys
        else:
            dataset.row_groups = image_groups(dataset.ds, dataset.cfg, dataset.columns["image"])
    return dataset.row_groups


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
        # Examples that draw from other examples (ITM's evaluation negatives) draw from this part's only.
        if hasattr(base, "keep_negatives_within"):
            base.keep_negatives_within(self.positions)

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
