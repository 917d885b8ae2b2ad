"""The config schema: typed dataclasses, merged from YAML files and dotted ``key=value`` overrides.

A config is a tree of plain dataclasses (``Config`` with ``model``, ``data``, ``train``, ``compare`` and
``study`` sections), each field documented by the comment above it (``vlfuse.config.field_docs`` and
``reference`` read those comments for ``--help`` and the docs' config reference). ``validate`` checks the
choices and ranges declared in each field's metadata; loading (YAML files and overrides merged onto the
schema) is ``vlfuse.config``'s. Every error names the dotted key and what is allowed.

This is the bottom layer of the library: it names no task. Which tasks exist, and the settings a task
refuses, are checked one layer up by ``vlfuse.config.load_config`` against the task registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

TRAINABLE_ENCODERS = ("none", "image", "text", "all")
FUSION_NAMES = ("concat", "transformer", "dense", "projection")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
MIXED_PRECISION = ("no", "fp16", "bf16")
# How a trainable tower learns (see LoraSettings and the towers' last_blocks).
TUNING = ("full", "lora", "last_blocks")
# recipes/compare.py's modes: a trainable_encoders value, or both towers trained with that tuning.
COMPARE_MODES = (*TRAINABLE_ENCODERS, "lora", "last_blocks")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


def _choices(default: str, choices: Sequence[str]) -> Any:
    return field(default=default, metadata={"choices": tuple(choices)})


def _at_least(default: Any, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum})


@dataclass
class LoraSettings:
    """Low-rank adapters (``tuning: lora``), with peft's ``LoraConfig`` names."""

    # Rank of each low-rank update.
    r: int = _at_least(8, 1)
    # The update is scaled by lora_alpha / r.
    lora_alpha: float = _at_least(16.0, 0.0)
    # Dropout on the adapters' input.
    lora_dropout: float = _at_least(0.0, 0.0)
    # Modules to adapt: full module names, or names they end with (peft's matching), e.g. [qkv] or
    # [query, value]. Empty: automatic: the attention q/k/v projections of transformers and timm ViTs;
    # a CNN's convolutions.
    target_modules: list[str] = field(default_factory=list)


def _tuning() -> Any:
    return field(default="full", metadata={"choices": TUNING})


@dataclass
class ImageEncoderConfig:
    # Any timm model name (``timm.list_models()``), e.g. resnet50.a1_in1k.
    name: str = "resnet50.a1_in1k"
    # Load pretrained weights (from the Hub, or from ``checkpoint``); false: random init, no download.
    pretrained: bool = True
    # A local weights file (.safetensors / .pth / .bin) used instead of the Hub's weights.
    checkpoint: str | None = None
    # Square input size in pixels; ViTs are built for it (position embeddings resampled).
    image_size: int = _at_least(384, 16)
    # Extra keyword arguments for ``timm.create_model`` (e.g. {output_stride: 16, drop_path_rate: 0.1}).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # How the tower learns when model.trainable_encoders includes it: full (every weight), lora (low-rank
    # adapters, the tower's weights frozen), last_blocks (the last ``last_blocks`` of timm's blocks).
    tuning: str = _tuning()
    lora: LoraSettings = field(default_factory=LoraSettings)
    # tuning=last_blocks: how many of timm's blocks (its fine group_matcher; a final norm goes with the
    # last) learn; the stem and earlier blocks stay frozen, their BatchNorm statistics too.
    last_blocks: int = _at_least(1, 1)


@dataclass
class TextEncoderConfig:
    # A Hub id, a local folder (config + tokenizer [+ weights]) or ``vlfuse:<name>`` for a bundled one.
    name: str = "bert-base-uncased"
    # Load pretrained weights; false: build from the config with random weights.
    pretrained: bool = True
    # Expressions are truncated to this many tokens.
    max_length: int = _at_least(40, 2)
    # Allow custom model code from the Hub (off unless you trust the repository).
    trust_remote_code: bool = False
    # How the tower learns when model.trainable_encoders includes it: full, lora or last_blocks.
    tuning: str = _tuning()
    lora: LoraSettings = field(default_factory=LoraSettings)
    # tuning=last_blocks: how many of the last transformer layers learn (a final norm goes with the
    # last); the embeddings and earlier layers stay frozen.
    last_blocks: int = _at_least(1, 1)


@dataclass
class FusionConfig:
    # concat: pooled features -> MLP; transformer: tokens + query token(s) (TransVG-style);
    # dense: text-conditioned (FiLM) feature map with coordinate channels, one box per location;
    # projection: no fusion, each tower's pooled vector projected to a shared embedding (retrieval).
    name: str = _choices("transformer", FUSION_NAMES)
    # Width of the fusion head.
    dim: int = _at_least(256, 8)
    # Transformer / conv layers in the fusion head.
    num_layers: int = _at_least(4, 1)
    # Attention heads (transformer).
    num_heads: int = _at_least(8, 1)
    # Learnable query tokens (transformer); the first one is the fused vector.
    num_queries: int = _at_least(1, 1)
    # Feed-forward width as a multiple of ``dim``.
    mlp_ratio: float = _at_least(4.0, 0.5)
    # Dropout inside the fusion head.
    dropout: float = _at_least(0.1, 0.0)


@dataclass
class ModelConfig:
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # none: fusion + head only over frozen encoders; image / text: that encoder too; all: end-to-end.
    trainable_encoders: str = _choices("none", TRAINABLE_ENCODERS)
    # A saved vlfuse model (a final/ folder or a Hub id) to start from; its encoders, fusion and head
    # replace the ones described above (trainable_encoders still applies).
    init_from: str | None = None
    # Which task head sits on the fusion output, by name in ``vlfuse.tasks.TASKS`` (the name of its recipe
    # and config folder): grounding (text -> box), retrieval (image-text embeddings; needs
    # fusion.name=projection), vqa (VQA-style answer classification; formerly classification), itm
    # (image-text matching: does the text describe the image?; formerly matching).
    task: str = "grounding"
    # classification: the answer vocabulary (the classifier's classes, most frequent first). Left empty,
    # it is built from the train split's data.num_answers most frequent answers and saved with the model.
    answers: list[str] = field(default_factory=list)
    # retrieval: the learnable temperature's starting value (logits = similarity / temperature).
    temperature: float = _at_least(0.07, 1e-4)


@dataclass
class DataConfig:
    # A Hub dataset id, a local folder (Hub layout or save_to_disk) or an embedded dataset name ("shapes").
    dataset: str = "shapes"
    # Hub revision (branch, tag or commit) to pin the dataset.
    revision: str | None = None
    # Dataset configuration name (``load_dataset(path, name)``), if the dataset has several.
    subset: str | None = None
    # A split name, optionally sliced by rows: "train", "validation[:1000]", "test[1000:]" (for datasets
    # that ship one split, e.g. lmms-lab/flickr30k).
    train_split: str = "train"
    # One split or a list of splits (each may be sliced); metrics are reported per split.
    eval_split: Any = "validation"
    # Task field -> dataset column. grounding: image, text, box; retrieval: image, text (a caption or a
    # list of captions); classification: image, question, answer (a string, a list of strings or a list
    # of {answer: ...} dicts).
    columns: dict[str, str] = field(default_factory=lambda: {"image": "image", "text": "text", "box": "box"})
    # Folder that relative image paths are resolved against.
    image_root: str | None = None
    # How the dataset's boxes are written: xyxy (corners), xywh (corner + size), cxcywh (centre + size).
    box_format: str = _choices("xyxy", BOX_FORMATS)
    # Boxes are in [0, 1] relative to the image rather than in pixels.
    box_normalized: bool = False
    # Probability of a horizontal flip in training (left/right words are swapped with it).
    hflip_prob: float = _at_least(0.0, 0.0)
    # Cap the number of rows read per split (quick experiments); null = all.
    max_train_samples: int | None = None
    # The same cap for each evaluation split; null = all.
    max_eval_samples: int | None = None
    # Rows of the train split held out for choosing settings: a count, or a fraction when at most 1, drawn at
    # random (data.subset_seed). Training never reads them; the evaluation split named "holdout" does.
    # 0 = none.
    holdout: float = _at_least(0, 0)
    # Train on a random part of the train split's (remaining) rows: a count, or a fraction when at most 1.
    # Nested: one seeded order of the rows, each size its first rows. null = all.
    train_subset: float | None = field(default=None, metadata={"min": 0})
    # Seed of the row order data.holdout and data.train_subset draw from (not train.seed: runs of several
    # seeds share their data).
    subset_seed: int = 0
    # Stop if more than this fraction of the examples seen so far are unusable (undecodable image, invalid
    # box); below it, bad examples are skipped and counted.
    max_bad_fraction: float = _at_least(0.01, 0.0)
    # DataLoader worker processes.
    num_workers: int = _at_least(0, 0)
    # Read the train split as a stream (Hub id, local data files, save_to_disk folder) instead of loading
    # it whole; needs train.max_steps. Evaluation splits are still loaded whole.
    streaming: bool = False
    # Streaming: examples per shuffled block (1 = the stream's order).
    shuffle_buffer: int = _at_least(1000, 1)
    # Streaming classification: the answer vocabulary is built from this many first rows of the stream.
    stream_vocabulary_rows: int = _at_least(100000, 1)
    # classification: the answer vocabulary keeps this many most frequent train answers; the rest map to
    # "unknown" (counted, never predicted).
    num_answers: int = _at_least(1000, 1)
    # Embedded dataset only: images in the train split.
    shapes_train_size: int = _at_least(20000, 1)
    # Embedded dataset only: images in the validation split.
    shapes_eval_size: int = _at_least(1000, 1)
    # Embedded dataset only: image size in pixels.
    shapes_image_size: int = _at_least(64, 16)
    # Embedded dataset only: the generator's seed.
    shapes_seed: int = 0


@dataclass
class TrainConfig:
    # Where the run writes config.yaml, metrics.jsonl, checkpoints/ and final/.
    output_dir: str = "runs/grounding"
    # Passes over the train split (unless max_steps is set).
    epochs: int = _at_least(10, 1)
    # When set, wins over epochs.
    max_steps: int | None = None
    # Per process.
    batch_size: int = _at_least(32, 1)
    # Evaluation batch size per process; null = batch_size.
    eval_batch_size: int | None = None
    # Learning rate of the fusion and task head.
    lr: float = _at_least(1.0e-4, 0.0)
    # Learning rate of trainable encoders.
    encoder_lr: float = _at_least(1.0e-5, 0.0)
    # AdamW weight decay (not on biases and norm weights).
    weight_decay: float = _at_least(0.01, 0.0)
    # Linear warm-up steps, then cosine decay to zero.
    warmup_steps: int = _at_least(0, 0)
    # Clip the gradient norm to this; null = no clipping.
    max_grad_norm: float | None = 1.0
    # Micro-batches per optimizer step.
    gradient_accumulation_steps: int = _at_least(1, 1)
    # Accelerate's mixed precision: no, fp16 or bf16.
    mixed_precision: str = _choices("no", MIXED_PRECISION)
    # Seed of every random number generator of the run.
    seed: int = 0
    # Evaluate every N optimizer steps; null = once per epoch.
    eval_every: int | None = None
    # Save a resumable checkpoint every N optimizer steps; null = only at the end.
    checkpoint_every: int | None = None
    # Checkpoints kept in output_dir/checkpoints.
    keep_last: int = _at_least(2, 1)
    # A checkpoint folder, or "latest" (the newest in output_dir/checkpoints).
    resume_from: str | None = None
    # Recompute activations of trainable encoders in the backward pass (less memory, more compute).
    gradient_checkpointing: bool = False
    # Frozen encoders only: compute their features once per split and read them back.
    cache_features: bool = False
    # Where cached features live; null = $VLFUSE_CACHE or ~/.cache/vlfuse, then features/.
    cache_dir: str | None = None
    # Storage type of cached features (float16 halves the disk and read cost).
    cache_dtype: str = _choices("float32", ("float32", "float16"))
    # Stop after this many consecutive optimizer steps with a NaN/inf loss or gradient (each is skipped).
    max_bad_steps: int = _at_least(10, 1)
    # Accelerate tracker: tensorboard | wandb | ... ; null = none.
    log_with: str | None = None
    # CPU threads per process when training on the CPU; null = cores / processes on this machine
    # (accelerate launch sets OMP_NUM_THREADS=1 on CPU, which would leave cores idle).
    cpu_threads: int | None = None
    # Print/log training loss every N steps.
    log_every: int = _at_least(10, 1)
    # Upload final/ (weights, config, model card) to the Hub at the end of the run (main process only).
    push_to_hub: bool = False
    # The Hub model repository to push to ("owner/name" or "name"); null = output_dir's folder name.
    hub_model_id: str | None = None
    # Create the repository private (when it does not exist yet); null = the Hub's default.
    hub_private: bool | None = None


@dataclass
class CompareConfig:
    # recipes/compare.py: the runs to train side by side (same data, head, budget): trainable_encoders
    # values (none, image, text, all; each tower learns as its tuning says), or lora / last_blocks (both
    # towers trainable, both with that tuning).
    modes: list[str] = field(default_factory=lambda: ["none", "image", "text", "all"])
    # The metric to plot against wall time (default: the task's primary metric).
    metric: str | None = None


@dataclass
class StudyConfig:
    # recipes/study.py: the modes to study (as compare.modes: trainable_encoders values, lora, last_blocks).
    modes: list[str] = field(default_factory=lambda: ["none", "lora", "all"])
    # Train set sizes: row counts, or fractions (at most 1) of the train split's rows left after the
    # validation rows. Nested: a smaller set is part of every larger one (data.subset_seed orders the rows).
    train_sizes: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    # One run per seed (train.seed) for every mode, size and learning rate.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Learning rates to try, per mode: the head's (train.lr) for none, the encoders' (train.encoder_lr) for
    # the others. A mode not named gets three rates around the config's: x0.3, x1, x3 (x3, x10, x30 of
    # train.encoder_lr for lora, whose adapters want larger rates).
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    # Rows of the train split held out to choose the learning rate on (a count, or a fraction of at most 1;
    # evaluated as the split "holdout"). Ignored with validation_split.
    validation: float = field(default=0.1, metadata={"min": 0})
    # A split to choose the learning rate on instead of held-out train rows (e.g. validation).
    validation_split: str | None = None
    # The metric rates are chosen and modes compared on (default: the task's primary metric).
    metric: str | None = None
    # Where trials are recorded: an SQLAlchemy URL; null = sqlite:///<train.output_dir>/study.db. A
    # postgresql://user@host/db URL lets workers on many machines run the same command and split the grid.
    storage: str | None = None
    # The study's name in the storage; null = the name of train.output_dir's folder.
    name: str | None = None
    # Run each trial in processes of its own through this command, e.g. "accelerate launch --config_file
    # recipes/configs/accelerate/multi_gpu.yaml" (it gets "-m vlfuse.study.trial <run config>"); null = in
    # this process.
    launch: str | None = None
    # Keep every trial's trained model (final/); otherwise only the recommended runs keep theirs.
    keep_models: bool = False
    # Frozen towers' features are computed once and shared by every trial that freezes them.
    cache_features: bool = True
    # Stop a trial early whose metric on the selection split, at an evaluation during training
    # (train.eval_every), is behind another rate's finished trial of the same mode, size and seed at that
    # step by more than prune_margin (an Optuna pruner); its rate is then never chosen.
    prune: bool = False
    # How far behind (in the study's metric) a trial may be before study.prune stops it.
    prune_margin: float = field(default=0.05, metadata={"min": 0})
    # Confidence level of the intervals and of the test that tells modes apart (paired t-test over seeds).
    confidence: float = field(default=0.95, metadata={"min": 0.5})
    # Seconds between a running trial's heartbeats (written to the storage).
    heartbeat_interval: int = _at_least(30, 1)
    # A trial with no heartbeat for this many seconds (its worker died) is failed and queued again.
    grace_period: int = _at_least(120, 1)
    # How many times a dead worker's trial is queued again.
    max_retries: int = _at_least(2, 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def validate(cfg: Any, prefix: str = "") -> None:
    """Checks choices and ranges declared in field metadata, recursively.

    Raises:
        ConfigError: naming the key, the bad value and what is allowed.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"invalid value {value!r} for '{key}'; allowed: {', '.join(choices)}")
        minimum = f.metadata.get("min")
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError(f"invalid value {value!r} for '{key}'; must be >= {minimum}")
    if isinstance(cfg, CompareConfig):
        bad = [m for m in cfg.modes if m not in COMPARE_MODES]
        if bad or not cfg.modes or len(set(cfg.modes)) != len(cfg.modes):
            raise ConfigError(
                f"invalid value {cfg.modes!r} for 'compare.modes'; allowed: distinct values of "
                f"{', '.join(COMPARE_MODES)}"
            )
    if isinstance(cfg, StudyConfig):
        _validate_study(cfg)
    if isinstance(cfg, DataConfig):
        splits = cfg.eval_split if isinstance(cfg.eval_split, list | tuple) else [cfg.eval_split]
        if not splits or not all(isinstance(s, str) and s for s in splits):
            raise ConfigError(
                f"invalid value {cfg.eval_split!r} for 'data.eval_split'; allowed: a split name or a list"
            )
        if isinstance(cfg.eval_split, tuple):
            cfg.eval_split = list(cfg.eval_split)


def _validate_study(cfg: StudyConfig) -> None:
    bad = [m for m in [*cfg.modes, *cfg.lr_grid] if m not in COMPARE_MODES]
    if bad or not cfg.modes or len(set(cfg.modes)) != len(cfg.modes):
        raise ConfigError(
            f"invalid value {cfg.modes!r} for 'study.modes' (or a key of study.lr_grid); allowed: distinct "
            f"values of {', '.join(COMPARE_MODES)}"
        )
    for key, values in (("train_sizes", cfg.train_sizes), ("seeds", cfg.seeds)):
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"invalid value {values!r} for 'study.{key}'; needs distinct values")
    if any(size <= 0 for size in cfg.train_sizes):
        raise ConfigError(f"invalid value {cfg.train_sizes!r} for 'study.train_sizes'; sizes must be > 0")
    for mode, rates in cfg.lr_grid.items():
        if not rates or any(not isinstance(r, int | float) or r <= 0 for r in rates):
            raise ConfigError(f"invalid value {rates!r} for 'study.lr_grid.{mode}'; needs rates > 0")
    if not cfg.confidence < 1:
        raise ConfigError(f"invalid value {cfg.confidence!r} for 'study.confidence'; must be < 1")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config (or any config section)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
