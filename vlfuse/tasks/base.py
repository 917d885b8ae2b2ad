"""The small interface a task plugs into the shared training loop with."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from vlfuse.config import Config
from vlfuse.model import VLFuseModel


class Task(Protocol):
    """What the training loop needs from a task; everything else is the loop's.

    Attributes:
        name: the task's name (``model.task``).
        primary_metric: the metric compared across runs (``recipes/compare.py``'s plot).
        report_metrics: the metrics a comparison table shows.
    """

    name: str
    primary_metric: str
    report_metrics: tuple[str, ...]

    def build_dataset(self, cfg: Config, model: VLFuseModel, split: str, train: bool) -> Dataset:
        """The examples of one split, preprocessed for ``model``."""

    # Optional: ``prepare(cfg, accelerator)``, called before the model is built, may fill in settings
    # from the data (the classification task builds ``model.answers`` there).

    def collator(self, model: VLFuseModel, train: bool) -> Any:
        """Turns a list of examples into a batch dict of tensors, with ``bad_rows`` (the count of unusable
        examples in it) and, for evaluation, a ``valid`` mask over placeholders kept for them."""

    def loss(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict]:
        """The training loss and its parts (for logging)."""

    def eval_values(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per-example tensors (first dim = batch) that ``metrics`` reduces after gathering all processes."""

    def metrics(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics over the whole split from the gathered per-example values."""


def load_task_split(cfg, split: str, train: bool):
    """The rows of ``split`` a task reads: capped at ``data.max_train_samples`` / ``max_eval_samples``."""
    from vlfuse.data.loading import load_split

    ds = load_split(cfg.data, split)
    limit = cfg.data.max_train_samples if train else cfg.data.max_eval_samples
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def build_image_text_dataset(cls, cfg, model, split: str, train: bool):
    """A task dataset of ``cls`` for one split, preprocessed for ``model`` (shared by every task)."""
    ds = load_task_split(cfg, split, train)
    enc = model.image_encoder
    return cls(
        ds,
        cfg.data,
        image_size=model.config.image_encoder.image_size,
        mean=enc.mean,
        std=enc.std,
        interpolation=enc.data_config.get("interpolation", "bilinear"),
        train=train,
        name=f"{cfg.data.dataset}[{split}]",
        tokenizer=model.text_encoder.tokenizer,
        max_length=model.text_encoder.max_length,
        seed=cfg.train.seed,
    )
