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
        primary_metric: the metric printed in the progress bar and compared across runs.
    """

    name: str
    primary_metric: str

    def build_dataset(self, cfg: Config, model: VLFuseModel, split: str, train: bool) -> Dataset:
        """The examples of one split, preprocessed for ``model``."""

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
