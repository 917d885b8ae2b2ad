"""Several datasets mixed by weight (``data.datasets``): the checks of its entries and each source's own
data section.

An entry names a dataset and any of the keys that describe one dataset (its splits, columns, box format,
image root, row caps), plus ``weight`` (its share of the training examples) and ``name`` (how metrics and
counts name it). Keys an entry leaves out come from the ``data`` section itself, so settings shared by
all sources are written once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from vlfuse.schema.fields import BOX_FORMATS, ConfigError

# The data keys one source may set for itself; the others (flips, workers, streaming, ...) are the run's.
SOURCE_KEYS = (
    "dataset",
    "revision",
    "subset",
    "train_split",
    "eval_split",
    "columns",
    "image_root",
    "box_format",
    "box_normalized",
    "max_train_samples",
    "max_eval_samples",
)
ENTRY_KEYS = (*SOURCE_KEYS, "weight", "name")
STOPPING = ("first_exhausted", "all_exhausted")


@dataclass
class Source:
    """One dataset of a mixed run: its name, weight and data section (the run's, with its keys set)."""

    name: str
    weight: float
    data: Any  # a DataConfig

    def config(self, cfg: Any) -> Any:
        """The run's config ``cfg`` with this source's data section."""
        own = copy.copy(cfg)
        own.data = self.data
        return own


def default_name(dataset: str) -> str:
    """A source's name when its entry gives none: the dataset's last path part (``jxu124/refcoco`` ->
    ``refcoco``)."""
    return PurePosixPath(str(dataset).rstrip("/")).name or str(dataset)


def validate_mixing(data: Any) -> None:
    """Checks ``data.datasets``: entries, keys, weights, box formats, names.

    Raises:
        ConfigError: naming the entry and key, e.g. ``data.datasets[1].colums``.
    """
    if data.datasets is None:
        return
    if data.holdout or data.train_subset is not None:
        raise ConfigError(
            "data.holdout and data.train_subset take parts of one train split; with data.datasets, cap each "
            "source with its own max_train_samples instead"
        )
    if not isinstance(data.datasets, list | tuple) or not data.datasets:
        raise ConfigError("'data.datasets' must be a non-empty list of {dataset: ..., weight: ...} entries")
    for i, entry in enumerate(data.datasets):
        key = f"data.datasets[{i}]"
        if not isinstance(entry, dict) or "dataset" not in entry:
            raise ConfigError(f"'{key}' must be a mapping with at least a 'dataset' key, got {entry!r}")
        if unknown := [k for k in entry if k not in ENTRY_KEYS]:
            raise ConfigError(
                f"unknown key '{key}.{unknown[0]}'; an entry takes: {', '.join(ENTRY_KEYS)} (other data "
                "settings are the run's, set once under data)"
            )
        if entry.get("box_format", BOX_FORMATS[0]) not in BOX_FORMATS:
            allowed = ", ".join(BOX_FORMATS)
            raise ConfigError(
                f"invalid value {entry['box_format']!r} for '{key}.box_format'; allowed: {allowed}"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"invalid value {weight!r} for '{key}.weight'; must be a number >= 0")
    if not any(entry.get("weight", 1.0) > 0 for entry in data.datasets):
        raise ConfigError("every 'data.datasets' entry has weight 0: nothing to train on")
    names = [entry.get("name") or default_name(entry["dataset"]) for entry in data.datasets]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two 'data.datasets' entries are named {twice!r}; give them distinct 'name's")


def sources(data: Any) -> list[Source]:
    """The sources of a run: each ``data.datasets`` entry over a copy of ``data``, or ``data`` itself as
    the only source (weight 1) when there is no list."""
    if not data.datasets:
        return [Source(default_name(data.dataset), 1.0, data)]
    out = []
    for entry in data.datasets:
        own = copy.deepcopy(data)
        own.datasets = None
        for key in SOURCE_KEYS:
            if key in entry:
                setattr(own, key, copy.deepcopy(entry[key]))
        name = entry.get("name") or default_name(entry["dataset"])
        out.append(Source(name, float(entry.get("weight", 1.0)), own))
    return out


def training_sources(data: Any) -> list[Source]:
    """The sources a run trains on: those with weight > 0 (a source of weight 0 is never read)."""
    return [source for source in sources(data) if source.weight > 0]
