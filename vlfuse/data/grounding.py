"""Grounding examples from a ``datasets.Dataset``: one (image, expression, box) per expression.

Rows are mapped through ``data.columns``; a text column may hold one string or a list of expressions
(each becomes its own example, in training and in evaluation). Boxes are read in ``data.box_format``
(absolute pixels, or [0, 1] with ``data.box_normalized``), checked against the image, letterboxed with it
and returned as normalized ``cxcywh`` in the model input.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from torch.utils.data import Dataset

from vlfuse.config import DataConfig
from vlfuse.data.loading import DataError, check_columns, load_image
from vlfuse.data.transforms import hflip, letterbox, to_tensor
from vlfuse.tasks.boxes import convert_boxes

FIELDS = ("image", "text", "box")


def _expressions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def to_absolute_xyxy(box: Any, box_format: str, normalized: bool, width: int, height: int) -> torch.Tensor:
    """A dataset box as absolute ``xyxy`` pixels of its image."""
    values = torch.as_tensor(box, dtype=torch.float32).flatten()
    if values.numel() != 4 or not torch.isfinite(values).all():
        raise DataError(f"box {box!r} is not 4 finite numbers")
    xyxy = convert_boxes(values, box_format, "xyxy")
    if normalized:
        xyxy = xyxy * torch.tensor([width, height, width, height], dtype=torch.float32)
    return xyxy


def clip_box(xyxy: torch.Tensor, width: int, height: int) -> torch.Tensor | None:
    """The box clipped to the image, or None if that leaves no valid box (zero or negative width or
    height, ``x1 < x0``, or nothing inside the image)."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:  # under a pixel: nothing a model could be scored on
        return None
    return torch.tensor([x0, y0, x1, y1])


@dataclass
class GroundingExample:
    pixel_values: torch.Tensor | None  # [3, S, S]; None when the image tower's features are cached
    text: str
    box: torch.Tensor  # [4] normalized cxcywh in the input
    original_box: torch.Tensor  # [4] xyxy in the original image's pixels
    meta: torch.Tensor  # [7] letterbox meta (see boxes_to_pixels)
    # Cached frozen-tower features (image_tokens, image_pooled, text_tokens, text_mask, text_pooled).
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BadExample:
    """A row that could not be used; the collator drops (training) or masks (evaluation) it and counts it.

    Attributes:
        reason: ``bad_image`` or ``bad_box``.
        detail: what was wrong, naming the row.
        placeholder: a blank example of the right shapes, standing in for it in evaluation batches.
    """

    reason: str
    detail: str
    placeholder: GroundingExample


class GroundingDataset(Dataset):
    """One example per (row, expression) of a split.

    Args:
        ds: the split.
        cfg: the data section (columns, box format, image root, flips).
        image_size: the square model input side.
        mean, std: normalisation of the image encoder.
        interpolation: resize interpolation of the image encoder.
        train: random horizontal flips (``data.hflip_prob``) only in training.
        name: the dataset name, for messages.
        tokenizer: when given, expressions longer than ``max_length`` tokens are counted (they are
            truncated at collation) and the rate is reported in ``counts``.
        max_length: the text encoder's ``max_length``.
        seed: with the epoch (``set_epoch``) and the index, decides each random flip, so that
            augmentation does not depend on the global RNG (prefetching would make resumes inexact).
    """

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
        check_columns(ds, cfg.columns, FIELDS, name or cfg.dataset)
        self.columns = {f: cfg.columns[f] for f in FIELDS}
        self.ds = ds.select_columns(list(dict.fromkeys(self.columns.values())))
        self.cfg = cfg
        self.image_size = image_size
        self.mean, self.std, self.interpolation = mean, std, interpolation
        self.train = train
        self.seed, self.epoch = seed, 0
        self.counts: Counter[str] = Counter()
        # Only the text column is read here: images stay undecoded until an example is asked for.
        self.index: list[tuple[int, int]] = []
        self.texts: list[str] = []  # the expression of each example, stripped
        texts = self.texts
        for row, value in enumerate(ds[self.columns["text"]]):
            expressions = _expressions(value)
            if not expressions:
                self.counts["missing_expression"] += 1
            for k, text in enumerate(expressions):
                if text.strip():
                    self.index.append((row, k))
                    texts.append(text.strip())
                else:
                    self.counts["empty_expression"] += 1
        self.counts["rows"] = len(ds)
        self.counts["examples"] = len(self.index)
        if tokenizer is not None and max_length is not None and texts:
            lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
            self.counts["truncated_expression"] = sum(n > max_length for n in lengths)

    def _bad(self, reason: str, detail: str) -> BadExample:
        s = self.image_size
        blank = GroundingExample(
            pixel_values=torch.zeros(3, s, s),
            text="",
            box=torch.tensor([0.5, 0.5, 1.0, 1.0]),
            original_box=torch.tensor([0.0, 0.0, float(s), float(s)]),
            meta=torch.tensor([1.0, 1.0, 0.0, 0.0, s, s, s]),
        )
        return BadExample(reason, detail, blank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def describe(self) -> str:
        """One line: rows, examples, and what was dropped or truncated."""
        c = self.counts
        parts = [f"{c['rows']:,} rows -> {c['examples']:,} examples"]
        for key in ("empty_expression", "missing_expression"):
            if c[key]:
                parts.append(f"{c[key]:,} {key.replace('_', ' ')}s dropped")
        if "truncated_expression" in c:
            rate = c["truncated_expression"] / max(c["examples"], 1)
            parts.append(f"{c['truncated_expression']:,} expressions ({rate:.1%}) truncated to max_length")
        return ", ".join(parts)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> GroundingExample | BadExample:
        row_idx, _ = self.index[i]
        try:
            row = self.ds[row_idx]
        except Exception as err:  # an undecodable embedded image fails inside datasets' decoding
            return self._bad("bad_image", f"row {row_idx}: {err}")
        try:
            image = load_image(row[self.columns["image"]], self.cfg.image_root)
        except DataError as err:
            if "not found" in str(err) and self.cfg.image_root is None:
                raise  # a configuration problem, not a bad row: stop with the hint
            return self._bad("bad_image", f"row {row_idx}: {err}")
        text = self.texts[i]
        w, h = image.size
        try:
            box = to_absolute_xyxy(
                row[self.columns["box"]], self.cfg.box_format, self.cfg.box_normalized, w, h
            )
        except (DataError, TypeError, ValueError) as err:
            return self._bad("bad_box", f"row {row_idx}: {err}")
        clipped = clip_box(box, w, h)
        if clipped is None:
            return self._bad(
                "bad_box", f"row {row_idx}: box {box.tolist()} is not a valid box in the {w}x{h} image"
            )
        flip_draw = random.Random(f"{self.seed}-{self.epoch}-{i}").random() if self.train else 1.0
        if flip_draw < self.cfg.hflip_prob:
            image, clipped, text = hflip(image, clipped, text)
        square, target, meta = letterbox(image, self.image_size, clipped, self.interpolation)
        return GroundingExample(to_tensor(square, self.mean, self.std), text, target, clipped, meta)


class GroundingCollator:
    """Stacks examples and tokenizes their expressions in one call.

    Bad examples are dropped in training. In evaluation (``keep_bad=True``) they stay as masked
    placeholders (``valid`` False) so every process gathers batches of the same shape. ``bad_rows`` counts
    them either way.
    """

    def __init__(self, tokenize, keep_bad: bool = False) -> None:
        self.tokenize = tokenize
        self.keep_bad = keep_bad

    def __call__(self, examples: list[GroundingExample | BadExample]) -> dict[str, torch.Tensor]:
        good = [e for e in examples if isinstance(e, GroundingExample)]
        n_bad = len(examples) - len(good)
        if self.keep_bad:
            valid = torch.tensor([isinstance(e, GroundingExample) for e in examples])
            examples = [e if isinstance(e, GroundingExample) else e.placeholder for e in examples]
        elif not good:
            raise DataError(
                f"all {len(examples)} examples of a training batch are unusable; "
                f"first: {examples[0].detail}. "
                "Check data.columns, data.box_format, data.box_normalized and data.image_root"
            )
        else:
            examples = good
            valid = torch.ones(len(good), dtype=torch.bool)
        batch: dict[str, torch.Tensor] = {}
        if examples[0].pixel_values is not None:
            batch["pixel_values"] = torch.stack([e.pixel_values for e in examples])
        for name in examples[0].features:
            batch[name] = torch.stack([e.features[name] for e in examples])
        if "text_tokens" not in batch:
            batch.update(self.tokenize([e.text for e in examples]))
        return {
            **batch,
            "boxes": torch.stack([e.box for e in examples]),
            "original_boxes": torch.stack([e.original_box for e in examples]),
            "meta": torch.stack([e.meta for e in examples]),
            "valid": valid,
            "bad_rows": torch.tensor(n_bad),
        }
