"""Image-text retrieval examples.

Training reads one (image, caption) pair per caption of a row: a caption column may hold one string or a
list (Flickr30k and COCO layouts give five per image). Evaluation reads one example per *image* with all
of its captions (padded to the split's most captions per image and masked), so every image is encoded
once however many captions it has.

Which rows are one image: each row, or with ``data.columns.image_id`` the rows sharing that column's
value (for layouts with one caption per row and the image repeated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch
from torch.utils.data import Dataset

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


@dataclass
class RetrievalImageExample:
    """One image and all of its captions (evaluation)."""

    pixel_values: torch.Tensor | None  # [3, S, S]
    texts: list[str]  # padded with "" to the split's most captions per image
    text_valid: torch.Tensor  # [C] bool: which of ``texts`` are real
    image_id: torch.Tensor
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

    def by_image(self) -> RetrievalImages:
        """The same split as one example per image with all of its captions (for evaluation)."""
        return RetrievalImages(self)


class RetrievalImages(Dataset):
    """One example per distinct image of a ``RetrievalDataset``, with all of its captions."""

    def __init__(self, base: RetrievalDataset) -> None:
        self.base = base
        self.counts = base.counts
        groups: dict[int, list[int]] = {}
        for i, image_id in enumerate(base.image_ids):
            groups.setdefault(image_id, []).append(i)
        self.groups = list(groups.items())  # (image id, its examples), in order of first appearance
        self.max_captions = max((len(g) for _, g in self.groups), default=1)

    def __len__(self) -> int:
        return len(self.groups)

    def describe(self) -> str:
        return self.base.describe() + f" (evaluated per image, up to {self.max_captions} captions each)"

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def _example(self, pixels: torch.Tensor, texts: list[str], image_id: int) -> RetrievalImageExample:
        pad = self.max_captions - len(texts)
        valid = torch.tensor([True] * len(texts) + [False] * pad)
        return RetrievalImageExample(pixels, texts + [""] * pad, valid, torch.tensor(image_id))

    def __getitem__(self, j: int) -> RetrievalImageExample | BadExample:
        image_id, members = self.groups[j]
        read = self.base.read_image(members[0])
        if isinstance(read, BadExample):
            s = self.base.image_size
            placeholder = self._example(torch.zeros(3, s, s), [], -1)
            return BadExample(read.reason, read.detail, placeholder)
        pixels, _, _ = self.base.pixels(read[1])
        return self._example(pixels, [self.base.texts[i] for i in members], image_id)


class RetrievalCollator(ExampleCollator):
    """Training batches of (image, caption) pairs with ``image_ids``, besides what ``ExampleCollator``
    adds."""

    def __init__(self, tokenize, keep_bad: bool = False) -> None:
        super().__init__(tokenize, {"image_ids": "image_id"}, keep_bad)


class RetrievalImagesCollator(ExampleCollator):
    """Evaluation batches of images with their captions: ``pixel_values`` ``[B, ...]``, the captions
    tokenized flat ``[B * C, T]`` (image-major), ``text_valid`` ``[B, C]`` and ``image_ids`` ``[B]``."""

    def __init__(self, tokenize) -> None:
        super().__init__(tokenize, {"image_ids": "image_id", "text_valid": "text_valid"}, keep_bad=True)

    def texts(self, examples: list[RetrievalImageExample]) -> list[str]:
        return [t for e in examples for t in e.texts]
