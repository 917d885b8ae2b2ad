"""Image-text retrieval examples: one (image, caption) pair per caption of a row.

A caption column may hold one string or a list (Flickr30k and COCO layouts give five per image). Every
example carries ``image_id``: rows with the same id are the same image in evaluation, so all of its
captions count as matches. The id is the row, or with ``data.columns.image_id`` the value of that column
(for layouts with one caption per row and the image repeated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch

from vlfuse.config import DataConfig
from vlfuse.data.examples import BadExample, ExampleCollator, ImageTextDataset
from vlfuse.data.loading import check_columns
from vlfuse.data.transforms import hflip


@dataclass
class RetrievalExample:
    pixel_values: torch.Tensor | None  # [3, S, S]
    text: str
    image_id: torch.Tensor  # scalar long: which image of the split this is
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class RetrievalDataset(ImageTextDataset):
    """One example per (row, caption). Takes the arguments of ``ImageTextDataset``."""

    FIELDS = ("image", "text")
    TEXT_FIELD = "text"
    TEXT_NOUN = "caption"

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, *args, **kwargs) -> None:
        super().__init__(ds, cfg, *args, **kwargs)
        rows = [row for row, _ in self.index]
        if "image_id" in cfg.columns:
            check_columns(ds, cfg.columns, ("image_id",), kwargs.get("name") or cfg.dataset)
            ids: dict = {}
            per_row = [ids.setdefault(v, len(ids)) for v in ds[cfg.columns["image_id"]]]
            self.image_ids = [per_row[r] for r in rows]
        else:
            self.image_ids = rows
        self.counts["images"] = len(set(self.image_ids))

    def describe_extra(self) -> list[str]:
        return [f"{self.counts['images']:,} distinct images"]

    def placeholder(self) -> RetrievalExample:
        s = self.image_size
        return RetrievalExample(torch.zeros(3, s, s), "", torch.tensor(-1))

    def __getitem__(self, i: int) -> RetrievalExample | BadExample:
        read = self.read_image(i)
        if isinstance(read, BadExample):
            return read
        _, image = read
        text = self.texts[i]
        if self.flips(i):  # left/right words in the caption are swapped with the image
            image, _, text = hflip(image, None, text)
        pixels, _, _ = self.pixels(image)
        return RetrievalExample(pixels, text, torch.tensor(self.image_ids[i]))


class RetrievalCollator(ExampleCollator):
    """Batches with ``image_ids`` besides what ``ExampleCollator`` adds."""

    def __init__(self, tokenize, keep_bad: bool = False) -> None:
        super().__init__(tokenize, {"image_ids": "image_id"}, keep_bad)
