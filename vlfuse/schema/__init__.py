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
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from vlfuse.schema.fields import (
    BOX_FORMATS,
    COMPARE_MODES,
    FUSION_NAMES,
    MIXED_PRECISION,
    TRAINABLE_ENCODERS,
    TUNING,
    ConfigError,
    at_least,
    one_of,
    top_only,
    trains_top_only,
)
from vlfuse.schema.mixing import STOPPING, validate_mixing
from vlfuse.schema.study import CompareConfig, StudyConfig, validate_compare, validate_study
from vlfuse.schema.trust import mask_url

__all__ = [
    "BOX_FORMATS",
    "COMPARE_MODES",
    "FUSION_NAMES",
    "MIXED_PRECISION",
    "TRAINABLE_ENCODERS",
    "TUNING",
    "CompareConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FusionConfig",
    "ImageEncoderConfig",
    "LoraSettings",
    "ModelConfig",
    "StudyConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "to_dict",
    "top_only",
    "trains_top_only",
    "to_yaml",
    "shown_dict",
    "shown_yaml",
    "validate",
]


@dataclass
class LoraSettings:
    """Low-rank adapters (``tuning: lora``), with peft's ``LoraConfig`` names."""

    # Rank of each low-rank update.
    r: int = at_least(8, 1)
    # The update is scaled by lora_alpha / r.
    lora_alpha: float = at_least(16.0, 0.0)
    # Dropout on the adapters' input.
    lora_dropout: float = at_least(0.0, 0.0)
    # Modules to adapt: full module names, or names they end with (peft's matching), e.g. [qkv] or
    # [query, value]. Empty: automatic: the attention q/k/v projections of transformers and timm ViTs;
    # a CNN's convolutions.
    target_modules: list[str] = field(default_factory=list)
    # Adapt only the targets in the tower's last N blocks (as last_blocks counts them); null = every block.
    # With the feature cache on, the tower's frozen earlier blocks are then computed once per input.
    last_blocks: int | None = at_least(None, 1)


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
    image_size: int = at_least(384, 16)
    # Extra keyword arguments for ``timm.create_model`` (e.g. {output_stride: 16, drop_path_rate: 0.1}).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # How the tower learns when model.trainable_encoders includes it: full (every weight), lora (low-rank
    # adapters, the tower's weights frozen), last_blocks (the last ``last_blocks`` of timm's blocks).
    tuning: str = _tuning()
    lora: LoraSettings = field(default_factory=LoraSettings)
    # tuning=last_blocks: how many of timm's blocks (its fine group_matcher; a final norm goes with the
    # last) learn; the stem and earlier blocks stay frozen, their BatchNorm statistics too.
    last_blocks: int = at_least(1, 1)


@dataclass
class TextEncoderConfig:
    # A Hub id, a local folder (config + tokenizer [+ weights]) or ``vlfuse:<name>`` for a bundled one.
    name: str = "bert-base-uncased"
    # Load pretrained weights; false: build from the config with random weights.
    pretrained: bool = True
    # Expressions are truncated to this many tokens.
    max_length: int = at_least(40, 2)
    # Allow custom model code from the Hub (off unless you trust the repository).
    trust_remote_code: bool = False
    # Hub revision (branch, tag or commit) of the text tower; pin a commit when trust_remote_code is on, so
    # the code that runs is the code you reviewed.
    revision: str | None = None
    # Attributes of the model's transformers config to change before it is built (each must exist), e.g.
    # {hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}: a frozen layer's dropout is random.
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # How the tower learns when model.trainable_encoders includes it: full, lora or last_blocks.
    tuning: str = _tuning()
    lora: LoraSettings = field(default_factory=LoraSettings)
    # tuning=last_blocks: how many of the last transformer layers learn (a final norm goes with the
    # last); the embeddings and earlier layers stay frozen.
    last_blocks: int = at_least(1, 1)


@dataclass
class FusionConfig:
    # concat: pooled features -> MLP; transformer: tokens + query token(s) (TransVG-style);
    # dense: text-conditioned (FiLM) feature map with coordinate channels, one box per location;
    # projection: no fusion, each tower's pooled vector projected to a shared embedding (retrieval).
    name: str = one_of("transformer", FUSION_NAMES)
    # Width of the fusion head.
    dim: int = at_least(256, 8)
    # Transformer / conv layers in the fusion head.
    num_layers: int = at_least(4, 1)
    # Attention heads (transformer).
    num_heads: int = at_least(8, 1)
    # Learnable query tokens (transformer); the first one is the fused vector.
    num_queries: int = at_least(1, 1)
    # Feed-forward width as a multiple of ``dim``.
    mlp_ratio: float = at_least(4.0, 0.5)
    # Dropout inside the fusion head.
    dropout: float = at_least(0.1, 0.0)


@dataclass
class ModelConfig:
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # none: fusion + head only over frozen encoders; image / text: that encoder too; all: end-to-end.
    trainable_encoders: str = one_of("none", TRAINABLE_ENCODERS)
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
    temperature: float = at_least(0.07, 1e-4)


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
    box_format: str = one_of("xyxy", BOX_FORMATS)
    # Boxes are in [0, 1] relative to the image rather than in pixels.
    box_normalized: bool = False
    # Probability of a horizontal flip in training (left/right words are swapped with it).
    hflip_prob: float = at_least(0.0, 0.0)
    # Cap the number of rows read per split (quick experiments); null = all.
    max_train_samples: int | None = None
    # The same cap for each evaluation split; null = all.
    max_eval_samples: int | None = None
    # Rows of the train split held out for choosing settings (0 = none): a count, or a fraction when at most
    # 1, drawn at random (data.subset_seed). Training never reads them; the evaluation split "holdout" does.
    holdout: float = at_least(0, 0)
    # Train on a random part of the train split's (remaining) rows: a count, or a fraction when at most 1.
    # Nested: one seeded order of the rows, each size its first rows. null = all.
    train_subset: float | None = field(default=None, metadata={"min": 0})
    # Seed of the order of the train split's images that data.holdout draws from (and data.train_subset,
    # unless train_subset_seed is set). Rows are drawn by image: the rows of one image stay on one side.
    subset_seed: int = 0
    # Seed of data.train_subset's own order of the images left after the held-out ones (drawn from both
    # seeds; the held-out rows stay data.subset_seed's). null: data.subset_seed's order. The study sets it
    # per seed unless study.shared_subsets.
    train_subset_seed: int | None = None
    # Stop if more than this fraction of the examples seen so far are unusable (undecodable image, invalid
    # box); below it, bad examples are skipped and counted.
    max_bad_fraction: float = at_least(0.01, 0.0)
    # DataLoader worker processes; null = 0 when the CPU computes (on 2 cores one worker gained 2% and two
    # lost 5%: they take the compute threads' cores), min(4, cores per process - 1) when a GPU does.
    num_workers: int | None = field(default=None, metadata={"min": 0})
    # Read the train split as a stream (Hub id, local data files, save_to_disk folder) instead of loading
    # it whole; needs train.max_steps. Evaluation splits are still loaded whole.
    streaming: bool = False
    # Streaming: examples per shuffled block (1 = the stream's order).
    shuffle_buffer: int = at_least(1000, 1)
    # Streaming classification: the answer vocabulary is built from this many first rows of the stream.
    stream_vocabulary_rows: int = at_least(100000, 1)
    # classification: the answer vocabulary keeps this many most frequent train answers; the rest map to
    # "unknown" (counted, never predicted).
    num_answers: int = at_least(1000, 1)
    # Several datasets mixed by weight (replaces dataset above for training and evaluation): a list of
    # {dataset, weight, name, ...} entries, each with any of dataset, revision, subset, train_split,
    # eval_split, columns, image_root, box_format, box_normalized, max_train_samples, max_eval_samples (the
    # rest from this section). Training draws each source's share of examples by weight (0 = never read);
    # evaluation reports every source's split ("<split>[<name>]") and all of them together ("<split>").
    datasets: Any = None
    # When a mixed epoch ends: first_exhausted (when the first source with weight > 0 is used up: no
    # example repeats) or all_exhausted (when every source has been read whole: smaller ones repeat).
    mix_stopping: str = one_of("first_exhausted", STOPPING)
    # Embedded dataset only: images in the train split.
    shapes_train_size: int = at_least(20000, 1)
    # Embedded dataset only: images in the validation split.
    shapes_eval_size: int = at_least(1000, 1)
    # Embedded dataset only: image size in pixels.
    shapes_image_size: int = at_least(64, 16)
    # Embedded dataset only: the generator's seed.
    shapes_seed: int = 0


@dataclass
class TrainConfig:
    # Where the run writes config.yaml, metrics.jsonl, checkpoints/ and final/.
    output_dir: str = "runs/grounding"
    # Passes over the train split (unless max_steps is set).
    epochs: int = at_least(10, 1)
    # When set, wins over epochs.
    max_steps: int | None = None
    # Per process.
    batch_size: int = at_least(32, 1)
    # Evaluation batch size per process; null = batch_size.
    eval_batch_size: int | None = None
    # Learning rate of the fusion and task head.
    lr: float = at_least(1.0e-4, 0.0)
    # Learning rate of trainable encoders.
    encoder_lr: float = at_least(1.0e-5, 0.0)
    # AdamW weight decay (not on biases and norm weights).
    weight_decay: float = at_least(0.01, 0.0)
    # Linear warm-up steps, then cosine decay to zero.
    warmup_steps: int = at_least(0, 0)
    # Clip the gradient norm to this; null = no clipping.
    max_grad_norm: float | None = 1.0
    # Micro-batches per optimizer step (each micro-batch's loss sees only its own examples).
    gradient_accumulation_steps: int = at_least(1, 1)
    # Gradient caching: run the batch through the model in chunks of this many examples (activations of
    # one chunk at a time) and still get the exact gradient of the loss over the whole batch (a
    # contrastive loss keeps every negative of the gathered batch). Costs one more forward pass; null = off.
    contrastive_chunk_size: int | None = field(default=None, metadata={"min": 1})
    # Accelerate's mixed precision: no, fp16 or bf16.
    mixed_precision: str = one_of("no", MIXED_PRECISION)
    # Seed of every random number generator of the run.
    seed: int = 0
    # Evaluate every N optimizer steps; null = once per epoch.
    eval_every: int | None = None
    # Save a resumable checkpoint every N optimizer steps; null = only at the end.
    checkpoint_every: int | None = None
    # Checkpoints kept in output_dir/checkpoints.
    keep_last: int = at_least(2, 1)
    # A checkpoint folder, or "latest" (the newest in output_dir/checkpoints).
    resume_from: str | None = None
    # Recompute activations of trainable encoders in the backward pass (less memory, more compute).
    gradient_checkpointing: bool = False
    # Compute frozen encoders' features once per split and read them back; a tower that trains only its
    # last blocks (tuning last_blocks, or lora with lora.last_blocks) reads its frozen prefix's output.
    cache_features: bool = False
    # Where cached features live; null = $VLFUSE_CACHE or ~/.cache/vlfuse, then features/.
    cache_dir: str | None = None
    # Storage type of cached features (float16 halves the disk and read cost).
    cache_dtype: str = one_of("float32", ("float32", "float16"))
    # Stop after this many consecutive optimizer steps with a NaN/inf loss or gradient (each is skipped).
    max_bad_steps: int = at_least(10, 1)
    # Accelerate tracker: tensorboard | wandb | ... ; null = none.
    log_with: str | None = None
    # CPU threads per process when training on the CPU; null = cores / processes on this machine
    # (accelerate launch sets OMP_NUM_THREADS=1 on CPU, which would leave cores idle).
    cpu_threads: int | None = None
    # Run a CNN image tower and the dense fusion's convolutions in channels-last memory order (faster
    # convolutions on CPUs and GPUs; values and saved weights unchanged). Not applied under FSDP/DeepSpeed.
    channels_last: bool = True
    # Keep freed CPU memory for reuse, process-wide (glibc's mallopt; Linux): no page faults on each step's
    # activations (CPU steps up to 1.3x faster), resident memory stays near its peak.
    reuse_cpu_memory: bool = True
    # torch.compile the towers that run, the fusion and the head (slower start, faster steps); without a
    # working compiler (no C++ compiler on CPU, no Triton on GPU) the run says so and stays eager.
    compile: bool = False
    # Deterministic algorithms only (torch.use_deterministic_algorithms, process-wide, via Accelerate's
    # set_seed): makes a compiled run bitwise reproducible and resumable (compiled embedding gradients are
    # otherwise summed in a varying order). Slower; on CUDA also set CUBLAS_WORKSPACE_CONFIG=:4096:8.
    deterministic: bool = False
    # AdamW's fused kernel where the device has one (CUDA, CPU), else its multi-tensor (foreach) kernel.
    fused_optimizer: bool = True
    # Print/log training loss every N steps.
    log_every: int = at_least(10, 1)
    # Upload final/ (weights, config, model card) to the Hub at the end of the run (main process only).
    push_to_hub: bool = False
    # The Hub model repository to push to ("owner/name" or "name"); null = output_dir's folder name.
    hub_model_id: str | None = None
    # Create the repository private (when it does not exist yet); null = the Hub's default.
    hub_private: bool | None = None


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
        validate_compare(cfg)
    if isinstance(cfg, StudyConfig):
        validate_study(cfg)
    if isinstance(cfg, DataConfig):
        splits = cfg.eval_split if isinstance(cfg.eval_split, list | tuple) else [cfg.eval_split]
        if not splits or not all(isinstance(s, str) and s for s in splits):
            raise ConfigError(
                f"invalid value {cfg.eval_split!r} for 'data.eval_split'; allowed: a split name or a list"
            )
        if isinstance(cfg.eval_split, tuple):
            cfg.eval_split = list(cfg.eval_split)
        validate_mixing(cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config (or any config section)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def shown_dict(cfg: Any) -> dict[str, Any]:
    """``to_dict(cfg)`` as it may be printed or written (``config.yaml``, ``summary.json``, trackers, cards,
    ``study.json``): the study storage URL's user, password and secret query parameters masked."""
    values = to_dict(cfg)
    study = values.get("study")
    if isinstance(study, dict) and study.get("storage"):
        study["storage"] = mask_url(study["storage"])
    return values


def shown_yaml(cfg: Any) -> str:
    """``shown_dict(cfg)`` as YAML."""
    return OmegaConf.to_yaml(OmegaConf.create(shown_dict(cfg)))
