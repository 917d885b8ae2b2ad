"""What every task's dataset shares: rows with an image and one or more texts, read lazily.

``ImageTextDataset`` maps a split through ``data.columns``, expands a text column that holds a list into
one example per text, counts empty and over-long texts, reads and letterboxes images, and turns an
unusable row into a counted ``BadExample`` instead of an exception. ``ExampleCollator`` stacks a task's
examples into a batch: bad examples are dropped in training and kept as masked placeholders in
evaluation, so that every process gathers batches of the same shape.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlfuse.data.loading import DataError, check_columns, load_image
from vlfuse.data.transforms import letterbox, letterbox_geometry, to_tensor
from vlfuse.schema import DataConfig


def texts_of(value: Any) -> list[str]:
    """A text cell as a list of strings: one string, or the strings of a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


@dataclass
class Source:
    """What one example is made from: its row (the mapped columns), its text and where it came from.

    Attributes:
        row: the row's cells by column name (images not yet decoded, or decoded by ``datasets``).
        text: the example's text, stripped.
        where: the row in messages, e.g. ``row 17``.
        image_id: which image of the split it shows (examples of one image share it).
        flip: whether it is horizontally flipped (training augmentation).
        index: its index in a map-style dataset; None for a streamed example.
    """

    row: dict[str, Any]
    text: str
    where: str
    image_id: int
    flip: bool = False
    index: int | None = None


@dataclass(frozen=True)
class KnownImage:
    """An image whose pixels a feature-cache build has already run through the tower: it stands in a
    row's image cell so that the example's labels (which may depend on the image's size) are made
    without decoding it again; such an example's ``pixel_values`` is None."""

    size: tuple[int, int]


@dataclass
class BadExample:
    """A row that could not be used; the collator drops (training) or masks (evaluation) it and counts it.

    Attributes:
        reason: ``bad_image``, ``bad_box`` or ``bad_answer``.
        detail: what was wrong, naming the row.
        placeholder: a blank example of the right shapes, standing in for it in evaluation batches.
        source: the index of its dataset in a mixed run (``data.datasets``).
    """

    reason: str
    detail: str
    placeholder: Any
    source: int = 0  # which dataset of a mixed run (data.datasets) it came from


class ImageTextDataset(Dataset):
    """One example per (row, text) of a split; images stay undecoded until an example is asked for.

    Subclasses set ``FIELDS`` (the task fields ``data.columns`` must map), ``TEXT_FIELD`` and ``TEXT_NOUN``
    (for messages), and implement ``example`` (one example from a ``Source``: a row and one of its texts)
    with ``read_image`` / ``pixels``, and ``placeholder``. The same ``example`` serves the map-style
    dataset (``__getitem__``) and a streamed split (``vlfuse.data.streaming``).
    ``LABEL_SETTINGS`` names the ``data`` keys that change a subclass's labels (the feature cache keys on
    them).

    Which rows are one image: each row, or with ``data.columns.image_id`` the rows sharing that column's
    value (layouts with one caption per row and the image repeated); ``image_ids`` holds it per example.

    Args:
        ds: the split.
        cfg: the data section (columns, image root, flips).
        image_size: the square model input side.
        mean, std: normalisation of the image encoder.
        interpolation: resize interpolation of the image encoder.
        train: random horizontal flips (``data.hflip_prob``) only in training.
        name: the dataset name, for messages.
        tokenizer: when given, texts longer than ``max_length`` tokens are counted (they are truncated at
            collation) and the rate is reported by ``describe``.
        max_length: the text encoder's ``max_length``.
        seed: with the epoch (``set_epoch``) and the index, decides each random flip, so that
            augmentation does not depend on the global RNG (prefetching would make resumes inexact).
    """

    FIELDS: tuple[str, ...] = ("image", "text")
    TEXT_FIELD = "text"
    TEXT_NOUN = "text"  # one word: it names the counters (empty_<noun>, truncated_<noun>)
    LABEL_SETTINGS: tuple[str, ...] = ()

    def __init__(
        self,
        ds: datasets.Dataset,
        cfg: DataConfig,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str = "bilinear",
        train: bool = False,
        name: str = "",
        tokenizer: Any = None,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        check_columns(ds, cfg.columns, self.FIELDS, name or cfg.dataset)
        self.columns = {f: cfg.columns[f] for f in self.FIELDS}
        self.ds = ds.select_columns(list(dict.fromkeys(self.columns.values())))
        self.cfg = cfg
        self.image_size = image_size
        self.mean, self.std, self.interpolation = mean, std, interpolation
        self.train = train
        self.seed, self.epoch = seed, 0
        self.counts: Counter[str] = Counter()
        noun = self.TEXT_NOUN
        # Only the text column is read here.
        self.index: list[tuple[int, int]] = []
        self.texts: list[str] = []  # the text of each example, stripped
        for row, value in enumerate(ds[self.columns[self.TEXT_FIELD]]):
            texts = texts_of(value)
            if not texts:
                self.counts[f"missing_{noun}"] += 1
            for k, text in enumerate(texts):
                if text.strip():
                    self.index.append((row, k))
                    self.texts.append(text.strip())
                else:
                    self.counts[f"empty_{noun}"] += 1
        self.counts["rows"] = len(ds)
        self.counts["examples"] = len(self.index)
        self.image_ids = self._image_ids(ds, [row for row, _ in self.index], name or cfg.dataset)
        if tokenizer is not None and max_length is not None and self.texts:
            lengths = [len(ids) for ids in tokenizer(self.texts, truncation=False)["input_ids"]]
            self.counts[f"truncated_{noun}"] = sum(n > max_length for n in lengths)

    def _image_ids(self, ds: datasets.Dataset, rows: list[int], name: str) -> list[int]:
        """Per example, which image of the split it shows (0, 1, ... in order of first appearance)."""
        if "image_id" not in self.cfg.columns:
            return rows
        check_columns(ds, self.cfg.columns, ("image_id",), name)
        ids: dict[Any, int] = {}
        per_row = [ids.setdefault(v, len(ids)) for v in ds[self.cfg.columns["image_id"]]]
        return [per_row[r] for r in rows]

    def cache_settings(self) -> dict[str, Any]:
        """What, besides the split's content, decides this dataset's examples (the feature cache's key)."""
        settings = {s: getattr(self.cfg, s) for s in self.LABEL_SETTINGS}
        return {"columns": dict(self.columns), "image_root": self.cfg.image_root, **settings}

    # ---------------------------------------------------------------------------------------- subclasses
    def placeholder(self) -> Any:
        """A blank example of the right shapes (stands in for a bad one in evaluation batches)."""
        raise NotImplementedError

    def example(self, source: Source) -> Any:
        """The example of ``source`` (a row and one of its texts), or a ``BadExample`` naming what is wrong
        with the row."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- shared
    def bad(self, reason: str, detail: str) -> BadExample:
        return BadExample(reason, detail, self.placeholder())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def describe(self) -> str:
        """One line: rows, examples, and what was dropped or truncated."""
        c, noun = self.counts, self.TEXT_NOUN
        parts = [f"{c['rows']:,} rows -> {c['examples']:,} examples"]
        for key in (f"empty_{noun}", f"missing_{noun}"):
            if c[key]:
                parts.append(f"{c[key]:,} {key.replace('_', ' ')}s dropped")
        if f"truncated_{noun}" in c:
            n = c[f"truncated_{noun}"]
            parts.append(f"{n:,} {self.TEXT_NOUN}s ({n / max(c['examples'], 1):.1%}) truncated to max_length")
        return ", ".join(parts + self.describe_extra())

    def describe_extra(self) -> list[str]:
        return []

    def text_features(self, i: int) -> dict[str, torch.Tensor]:
        """Cached text features of example ``i``: none here (the feature cache's datasets have them)."""
        return {}

    def blank_features(self) -> dict[str, torch.Tensor]:
        """Blank cached features for a bad row's placeholder: none here (see ``text_features``)."""
        return {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:
        row = self.read_row(i)
        return row if isinstance(row, BadExample) else self.example_from(i, row)

    def read_row(self, i: int, table: datasets.Dataset | None = None) -> dict[str, Any] | BadExample:
        """The cells of example ``i``'s row in ``table`` (default: the split with its images decoded; the
        feature cache's build reads ``undecoded()``), or a bad example naming the row when they cannot be
        read (an undecodable embedded image fails inside datasets' decoding)."""
        row_idx = self.index[i][0]
        try:
            return (self.ds if table is None else table)[row_idx]
        except Exception as err:
            return self.bad("bad_image", f"row {row_idx}: {err}")

    def example_from(self, i: int, row: dict[str, Any]) -> Any:
        """Example ``i`` made from its row's cells ``row`` (as read from ``ds`` or ``undecoded()``)."""
        row_idx = self.index[i][0]
        return self.example(Source(row, self.texts[i], f"row {row_idx}", self.image_ids[i], self.flips(i), i))

    def undecoded(self) -> datasets.Dataset:
        """The split with its image column left encoded (``{bytes, path}``), for readers that decode an
        image once for several rows (the feature cache's build)."""
        column = self.columns["image"]
        feature = self.ds.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            return self.ds.cast_column(column, datasets.Image(decode=False))
        return self.ds

    def read_image(self, source: Source) -> Image.Image | KnownImage | BadExample:
        """The RGB image of ``source``'s row, or a ``BadExample`` for an undecodable or missing image
        (a ``KnownImage`` cell is returned as it is).

        Raises:
            DataError: a relative image path with no ``data.image_root`` (a config problem, not a bad row).
        """
        cell = source.row[self.columns["image"]]
        if isinstance(cell, KnownImage):
            return cell
        try:
            return load_image(cell, self.cfg.image_root)
        except DataError as err:
            if "not found" in str(err) and self.cfg.image_root is None:
                raise  # a configuration problem, not a bad row: stop with the hint
            return self.bad("bad_image", f"{source.where}: {err}")

    def flips(self, key: int | str, epoch: int | None = None) -> bool:
        """Whether the example ``key`` (an index, or a streamed example's position) is flipped in
        ``epoch`` (default: this dataset's): training only, keyed by seed, epoch and ``key``."""
        if not self.train or self.cfg.hflip_prob <= 0:
            return False
        epoch = self.epoch if epoch is None else epoch
        return random.Random(f"{self.seed}-{epoch}-{key}").random() < self.cfg.hflip_prob

    def pixels(
        self, image: Image.Image | KnownImage, box: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Letterboxed, normalized pixels ``[3, S, S]``, the moved box (if any) and the letterbox meta
        (for a ``KnownImage``: no pixels, the same box and meta)."""
        if isinstance(image, KnownImage):
            _, target, meta = letterbox_geometry(*image.size, self.image_size, box)
            return None, target, meta
        square, target, meta = letterbox(image, self.image_size, box, self.interpolation)
        return to_tensor(square, self.mean, self.std), target, meta


class ExampleCollator:
    """Stacks examples (dataclasses with ``pixel_values``, ``text``, ``features`` and the tensor fields
    named in ``fields``) and tokenizes their texts in one call.

    Bad examples are dropped in training. In evaluation (``keep_bad=True``) they stay as masked
    placeholders (``valid`` False) so every process gathers batches of the same shape. ``bad_rows`` counts
    them either way.

    A task's collator is declared by its field map: a subclass that sets ``fields`` (batch key -> example
    attribute, for the task's tensors).

    Args:
        tokenize: the text encoder's ``tokenize``.
        keep_bad: evaluation mode (see above).
    """

    fields: ClassVar[dict[str, str]] = {}

    def __init__(self, tokenize, keep_bad: bool = False) -> None:
        self.tokenize = tokenize
        self.keep_bad = keep_bad

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        good = [e for e in examples if not isinstance(e, BadExample)]
        n_bad = len(examples) - len(good)
        if self.keep_bad:
            valid = torch.tensor([not isinstance(e, BadExample) for e in examples])
            examples = [e.placeholder if isinstance(e, BadExample) else e for e in examples]
        elif not good:
            raise DataError(
                f"all {len(examples)} examples of a training batch are unusable; "
                f"first: {examples[0].detail}. Check data.columns and data.image_root, and the settings "
                "that say how the task's labels are read (e.g. data.box_format, data.box_normalized)"
            )
        else:
            examples = good
            valid = torch.ones(len(good), dtype=torch.bool)
        batch: dict[str, torch.Tensor] = {}
        if examples[0].pixel_values is not None:
            batch["pixel_values"] = torch.stack([e.pixel_values for e in examples])
        for name in examples[0].features:
            batch[name] = torch.stack([e.features[name] for e in examples])
        if "text_pooled" not in batch and "text_prefix" not in batch:  # not cached: tokenize for the tower
            batch.update(self.tokenize(self.texts(examples)))
        for key, attr in self.fields.items():
            batch[key] = torch.stack([torch.as_tensor(getattr(e, attr)) for e in examples])
        return {**batch, "valid": valid, "bad_rows": torch.tensor(n_bad)}

    def texts(self, examples: list[Any]) -> list[str]:
        """The texts to tokenize for a batch: one per example here."""
        return [e.text for e in examples]
