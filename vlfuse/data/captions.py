"""Captioned images, the examples that image-text retrieval and matching share: one example per
(image, caption) for training, and one per image with all of its captions for evaluation.

A caption column may hold one string or a list (Flickr30k and COCO layouts give five per image). Which
rows are one image: each row, or with ``data.columns.image_id`` the rows sharing that column's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from vlfuse.data.examples import BadExample, ImageTextDataset, Source
from vlfuse.data.transforms import hflip


@dataclass
class CaptionExample:
    pixel_values: torch.Tensor | None  # [3, S, S]
    text: str
    image_id: torch.Tensor  # scalar long: which image of the split this is
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ImageCaptionsExample:
    """One image and all of its captions (evaluation)."""

    pixel_values: torch.Tensor | None  # [3, S, S]
    texts: list[str]  # padded with "" to the split's most captions per image
    text_valid: torch.Tensor  # [C] bool: which of ``texts`` are real
    image_id: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class CaptionDataset(ImageTextDataset):
    """One example per (row, caption). Takes the arguments of ``ImageTextDataset``."""

    FIELDS = ("image", "text")
    TEXT_FIELD = "text"
    TEXT_NOUN = "caption"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts["images"] = len(set(self.image_ids))

    def describe_extra(self) -> list[str]:
        return [f"{self.counts['images']:,} distinct images"]

    def placeholder(self) -> CaptionExample:
        s = self.image_size
        return CaptionExample(torch.zeros(3, s, s), "", torch.tensor(-1))

    def example(self, source: Source) -> CaptionExample | BadExample:
        image = self.read_image(source)
        if isinstance(image, BadExample):
            return image
        text = source.text
        if source.flip:  # left/right words in the caption are swapped with the image
            image, _, text = hflip(image, None, text)
        pixels, _, _ = self.pixels(image)
        return CaptionExample(pixels, text, torch.tensor(source.image_id))

    def by_image(self) -> ImageCaptions:
        """The same split as one example per image with all of its captions (for evaluation)."""
        return ImageCaptions(self)


class ImageCaptions(Dataset):
    """One example per distinct image of a ``CaptionDataset``, with all of its captions."""

    def __init__(self, base: CaptionDataset) -> None:
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

    def _example(
        self, pixels: torch.Tensor | None, texts: list[str], image_id: int, features: dict[str, torch.Tensor]
    ) -> ImageCaptionsExample:
        pad = self.max_captions - len(texts)
        valid = torch.tensor([True] * len(texts) + [False] * pad)
        return ImageCaptionsExample(pixels, texts + [""] * pad, valid, torch.tensor(image_id), features)

    def _text_features(self, members: list[int]) -> dict[str, torch.Tensor]:
        """Cached text features of the captions ``members``, ``[C, ...]`` padded with blanks (none when
        the text tower runs live)."""
        blank = {k: v for k, v in self.base.blank_features().items() if k.startswith("text_")}
        if not blank:
            return {}
        rows = [self.base.text_features(i) for i in members] + [blank] * (self.max_captions - len(members))
        return {k: torch.stack([row[k] for row in rows]) for k in blank}

    def __getitem__(self, j: int) -> ImageCaptionsExample | BadExample:
        image_id, members = self.groups[j]
        first = self.base[members[0]]  # the image (pixels, or its cached features), read once
        if isinstance(first, BadExample):
            image = {k: v for k, v in first.placeholder.features.items() if k.startswith("image_")}
            placeholder = self._example(
                first.placeholder.pixel_values, [], -1, {**image, **self._text_features([])}
            )
            return BadExample(first.reason, first.detail, placeholder)
        image = {k: v for k, v in first.features.items() if k.startswith("image_")}
        texts = [self.base.texts[i] for i in members]
        return self._example(first.pixel_values, texts, image_id, {**image, **self._text_features(members)})
