"""Retrieval batches: (image, caption) pairs for training, images with all of their captions for
evaluation (the examples are ``vlfuse.data.captions``')."""

from __future__ import annotations

from typing import Any

import torch

from vlfuse.data.cache_build import FEATURES
from vlfuse.data.captions import ImageCaptionsExample
from vlfuse.data.examples import ExampleCollator
from vlfuse.tasks.retrieval.evaluation import input_keys


class RetrievalCollator(ExampleCollator):
    """Training batches of (image, caption) pairs with ``image_ids``, besides what ``ExampleCollator``
    adds."""

    fields = {"image_ids": "image_id"}


class RetrievalImagesCollator(ExampleCollator):
    """Evaluation batches of images with their captions: ``pixel_values`` ``[B, ...]``, the captions
    tokenized flat ``[B * C, T]`` (image-major), ``text_valid`` ``[B, C]``, ``image_ids`` ``[B]``, and the
    inputs' keys (``image_keys`` ``[B, 2]``, ``text_keys`` ``[B * C, 2]``: what makes two of them one
    input, ``vlfuse.tasks.retrieval.evaluation``), computed here on the CPU (in the loader's workers)."""

    fields = {"image_ids": "image_id", "text_valid": "text_valid"}

    def __init__(self, tokenize) -> None:
        super().__init__(tokenize, keep_bad=True)

    def texts(self, examples: list[ImageCaptionsExample]) -> list[str]:
        return [t for e in examples for t in e.texts]

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        for key in FEATURES["text"]:  # cached, [B, C, ...] -> [B * C, ...]
            if key in batch:
                batch[key] = batch[key].flatten(0, 1)
        batch["image_keys"], batch["text_keys"] = input_keys(batch)
        return batch
