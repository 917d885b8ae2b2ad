"""Grounding examples from a ``datasets.Dataset``: one (image, expression, box) per expression.

Rows are mapped through ``data.columns``; a text column may hold one string or a list of expressions
(each becomes its own example, in training and in evaluation). Boxes are read in ``data.box_format``
(absolute pixels, or [0, 1] with ``data.box_normalized``), checked against the image, letterboxed with it
and returned as normalized ``cxcywh`` in the model input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlfuse.data.examples import BadExample, ExampleCollator, ImageTextDataset
from vlfuse.data.loading import DataError
from vlfuse.data.transforms import hflip
from vlfuse.tasks.boxes import convert_boxes

FIELDS = ("image", "text", "box")


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


class GroundingDataset(ImageTextDataset):
    """One example per (row, expression) of a split: an image, an expression and the referent's box.

    Takes the arguments of ``ImageTextDataset``; ``data.box_format`` / ``data.box_normalized`` say how
    boxes are read.
    """

    FIELDS = FIELDS
    TEXT_FIELD = "text"
    TEXT_NOUN = "expression"

    def placeholder(self) -> GroundingExample:
        s = self.image_size
        return GroundingExample(
            pixel_values=torch.zeros(3, s, s),
            text="",
            box=torch.tensor([0.5, 0.5, 1.0, 1.0]),
            original_box=torch.tensor([0.0, 0.0, float(s), float(s)]),
            meta=torch.tensor([1.0, 1.0, 0.0, 0.0, s, s, s]),
        )

    def __getitem__(self, i: int) -> GroundingExample | BadExample:
        read = self.read_image(i)
        if isinstance(read, BadExample):
            return read
        row, image = read
        row_idx = self.index[i][0]
        text = self.texts[i]
        w, h = image.size
        try:
            box = to_absolute_xyxy(
                row[self.columns["box"]], self.cfg.box_format, self.cfg.box_normalized, w, h
            )
        except (DataError, TypeError, ValueError) as err:
            return self.bad("bad_box", f"row {row_idx}: {err}")
        clipped = clip_box(box, w, h)
        if clipped is None:
            return self.bad(
                "bad_box", f"row {row_idx}: box {box.tolist()} is not a valid box in the {w}x{h} image"
            )
        if self.flips(i):
            image, clipped, text = hflip(image, clipped, text)
        pixels, target, meta = self.pixels(image, clipped)
        return GroundingExample(pixels, text, target, clipped, meta)


class GroundingCollator(ExampleCollator):
    """Batches of grounding examples: ``boxes`` (normalized cxcywh in the input), ``original_boxes``
    (xyxy in the original pixels) and ``meta`` (the letterbox meta), plus what ``ExampleCollator`` adds."""

    def __init__(self, tokenize, keep_bad: bool = False) -> None:
        super().__init__(
            tokenize, {"boxes": "box", "original_boxes": "original_box", "meta": "meta"}, keep_bad
        )
