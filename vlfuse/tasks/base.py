"""The interface a task plugs in with, and the parts several tasks share.

A task is a subclass of ``Task`` in its own module of ``vlfuse.tasks``, listed once in the registry
(``vlfuse.tasks.TASKS``). It owns everything specific to it: the head it puts on the fusion output, its
dataset and collator, loss, metrics, how ``predict`` decodes the head's outputs, which fusion heads it
accepts, whether the frozen-feature cache can serve it, and the settings it refuses. The model, the
training loop, the config loader, the comparison and the recipes only go through this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from torch import nn

from vlfuse.data.examples import ImageTextDataset
from vlfuse.data.loading import load_split, stream_head
from vlfuse.data.transforms import preprocess_images
from vlfuse.encoders import ImageEncoder, TextEncoder
from vlfuse.fusion import FusionOutput
from vlfuse.schema import Config, ModelConfig

Batch = dict[str, torch.Tensor]
Images = Sequence[Image.Image] | Image.Image
Texts = Sequence[str] | str


class TaskModel(Protocol):
    """What a task reads from the model it serves (``VLFuseModel`` is one)."""

    config: ModelConfig
    image_encoder: ImageEncoder
    text_encoder: TextEncoder

    def infer(
        self, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The model's outputs in eval mode on raw images and/or texts, and the images' letterbox meta."""


class TaskDataset(Protocol):
    """What the training loop reads from a task's dataset besides ``__len__`` / ``__getitem__``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...

    def describe(self) -> str:
        """One line for the log: rows, examples, what was dropped or truncated."""

    def set_epoch(self, epoch: int) -> None:
        """Called before every epoch (random augmentation is keyed by seed, epoch and index)."""


class Task:
    """Base class of every task. Subclasses set the class attributes and implement the methods that
    raise ``NotImplementedError``; the others have defaults that suit most tasks.

    Attributes:
        name: the task's name, ``model.task``.
        recipe: the script that trains it (named in messages).
        primary_metric: the metric compared across runs (``recipes/compare.py``'s plot).
        report_metrics: the metrics a comparison table shows.
        fusions: the fusion heads (``model.fusion.name``) it accepts.
        feature_cache: whether ``train.cache_features`` can serve its datasets (built on
            ``ImageTextDataset``s with tensor labels; see ``over_examples``).
        bad_rows: what makes a row unusable, for messages.
        data_hint: the settings to check when many rows are unusable.
    """

    name: ClassVar[str]
    recipe: ClassVar[str]
    primary_metric: ClassVar[str]
    report_metrics: ClassVar[tuple[str, ...]]
    fusions: ClassVar[tuple[str, ...]] = ("concat", "transformer", "dense")
    feature_cache: ClassVar[bool] = False
    bad_rows: ClassVar[str] = "undecodable images"
    data_hint: ClassVar[str] = "check data.columns and data.image_root"

    # ------------------------------------------------------------------------------------ config and set-up
    def check_config(self, cfg: Config) -> None:
        """Refuses settings that are valid alone but not for this task (raises ``ConfigError``)."""

    def prepare(self, cfg: Config, accelerator: Accelerator) -> None:
        """Fills in settings from the data before the model is built (e.g. an answer vocabulary)."""

    # ----------------------------------------------------------------------------------------------- model
    def build_head(self, cfg: ModelConfig, fusion: nn.Module) -> nn.Module:
        """The head over ``fusion``'s output (``fusion.output_kind``, ``fusion.dim``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ data
    def build_dataset(self, cfg: Config, model: TaskModel, split: str, train: bool) -> TaskDataset:
        """The examples of one split, preprocessed for ``model``."""
        raise NotImplementedError

    def over_examples(self, dataset: TaskDataset, wrap: Callable[[Any], TaskDataset]) -> TaskDataset:
        """``dataset`` rebuilt over ``wrap`` of its ``ImageTextDataset`` of one image and one text per
        example: the feature cache's dataset (``train.cache_features``), or a part of the split's rows
        (``data.holdout``, ``data.train_subset``). A task whose dataset is built over such a dataset (e.g.
        grouped per image for evaluation) rebuilds it over the wrapped one."""
        return wrap(dataset)

    def collator(self, model: TaskModel, train: bool) -> Callable[[list[Any]], Batch]:
        """Turns a list of examples into a batch dict of tensors, with ``bad_rows`` (the count of unusable
        examples in it) and ``valid`` (in evaluation, a mask over placeholders kept for them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ loss and metrics
    def loss(self, outputs: Batch, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its parts (for logging)."""
        raise NotImplementedError

    def eval_loop(self, accelerator: Accelerator, model: nn.Module, loader: Iterable[Batch]) -> Batch:
        """Runs ``model`` (in eval mode, without gradients) over an evaluation split and returns its
        per-example values (``eval_values``) gathered over all processes, in the split's order: the
        duplicates Accelerate adds to even out the processes' last batches are dropped. Every process
        runs the model the same number of times (DDP and FSDP need it)."""
        values: dict[str, list[torch.Tensor]] = {}
        for batch in loader:
            batch.pop("bad_rows")
            gathered = accelerator.gather_for_metrics(self.eval_values(model(**batch), batch))
            for k, v in gathered.items():
                values.setdefault(k, []).append(v.detach().float().cpu())
        return {k: torch.cat(v) for k, v in values.items()}

    def eval_values(self, outputs: Batch, batch: Batch) -> Batch:
        """Per-example tensors (first dim = batch) gathered over all processes for ``metrics``: the task's
        ``example_values`` and the batch's ``valid`` mask (the loop counts bad rows from it)."""
        return {**self.example_values(outputs, batch), "valid": batch["valid"]}

    def example_values(self, outputs: Batch, batch: Batch) -> Batch:
        """The task's per-example tensors (first dim = batch) for its metrics."""
        raise NotImplementedError

    def metrics(self, values: Batch) -> dict[str, float]:
        """Metrics over the whole split: the usable examples' gathered values (``valid``, applied here
        once for every task), reduced by ``metrics_of``."""
        keep = values["valid"].bool()
        return self.metrics_of({k: v[keep] for k, v in values.items() if k != "valid"})

    def metrics_of(self, values: Batch) -> dict[str, float]:
        """Metrics from the usable examples' values (``example_values``, gathered over the split)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- predict
    def predict(self, model: TaskModel, images: Images | None, texts: Texts | None) -> Any:
        """``VLFuseModel.predict``: the head's outputs on raw inputs, decoded for users."""
        raise NotImplementedError

    def paired_outputs(
        self, model: TaskModel, images: Images | None, texts: Texts | None
    ) -> tuple[Batch, torch.Tensor | None]:
        """The model's outputs on (image, text) pairs (one image may serve all texts) and the images'
        letterbox meta: what a task that fuses both inputs decodes in ``predict``."""
        if images is None or texts is None:
            raise ValueError(f"predict for task {self.name!r} needs images and texts")
        return model.infer(*pair_inputs(images, texts))

    def embed(self, model: TaskModel, images: Images | None = None, texts: Texts | None = None) -> Any:
        """``VLFuseModel.embed_images`` / ``embed_texts``: only tasks with separate embeddings have them."""
        raise ValueError(f"embeddings come from a retrieval model; this model's task is {self.name!r}")

    def class_names(self, cfg: ModelConfig) -> list[str]:
        """The names of the head's classes, in order (``VLFuseModel.answer_vocabulary``)."""
        raise ValueError(f"a {self.name!r} model has no answer vocabulary")


# ------------------------------------------------------------------------------------------ shared parts
# A streamed train split's task dataset is built over its first rows: the template that makes the examples
# of every streamed row (``vlfuse.data.streaming``).
STREAM_TEMPLATE_ROWS = 64


def load_task_split(cfg: Config, split: str, train: bool):
    """The rows of ``split`` a task reads: capped at ``data.max_train_samples`` / ``max_eval_samples``;
    with ``data.streaming``, the train split's first ``STREAM_TEMPLATE_ROWS`` rows only."""
    if train and cfg.data.streaming:
        return stream_head(cfg.data, split, STREAM_TEMPLATE_ROWS)
    ds = load_split(cfg.data, split)
    limit = cfg.data.max_train_samples if train else cfg.data.max_eval_samples
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def build_image_text_dataset(
    cls: type[ImageTextDataset], cfg: Config, model: TaskModel, split: str, train: bool
) -> ImageTextDataset:
    """A dataset of ``cls`` for one split, preprocessed for ``model``'s encoders."""
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


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A classifier head's loss (targets: class indices or per-class probabilities), in fp32, and its
    part for the log."""
    loss = F.cross_entropy(logits.float(), targets)
    return loss, {"ce": loss.detach()}


@torch.no_grad()
def infer(
    model: Any, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``model`` in eval mode on raw images and/or texts (its train mode is restored after): the images
    preprocessed as its image tower expects, the texts tokenized by its text tower.

    Returns:
        The head's outputs, and the images' letterbox meta (what maps boxes back to their pixels; None
        without images).
    """
    was_training = model.training
    model.eval()
    device, inputs, meta = next(model.fusion.parameters()).device, {}, None
    if images is not None:
        tower = model.image_encoder
        interpolation = tower.data_config.get("interpolation", "bilinear")
        pixels, meta = preprocess_images(images, tower.cfg.image_size, tower.mean, tower.std, interpolation)
        inputs["pixel_values"] = pixels.to(device)
    if texts is not None:
        inputs.update({k: v.to(device) for k, v in model.text_encoder.tokenize(list(texts)).items()})
    try:
        return model(**inputs), meta
    finally:
        model.train(was_training)


def pair_inputs(images: Images, texts: Texts) -> tuple[list[Image.Image], list[str]]:
    """One image per text for ``predict``: single items become lists; one image serves all texts."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(images) == 1 and len(texts) > 1:
        images = images * len(texts)
    if len(images) != len(texts):
        raise ValueError(f"predict got {len(images)} images and {len(texts)} texts; give one text per image")
    return images, texts


class ClassifierHead(nn.Module):
    """Class logits ``[B, num_classes]`` from a fused vector, or from a fused map by global max pooling
    (FiLM's classifier)."""

    def __init__(self, dim: int, kind: str, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in ("vector", "dense"):
            raise ValueError(f"a classifier head needs a vector or dense fusion output, not {kind!r}")
        self.kind = kind
        self.project = nn.Conv2d(dim, dim, 1) if kind == "dense" else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, num_classes)
        )

    def forward(self, fused: FusionOutput) -> dict[str, torch.Tensor]:
        if self.kind == "dense":
            x = F.relu(self.project(fused.dense)).amax(dim=(2, 3))
        else:
            x = fused.vector
        return {"logits": self.mlp(x)}
