"""Set-up before the loop: the accelerator, the model, the optimizer and scheduler, ``prepare``, and the
run's containers (``Run``: what the loop works with; ``TrainState``: where it is)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from vlfuse.checkpointing import FrozenWeights
from vlfuse.distributed import ignore_in_ddp, use_fsdp_on_cpu_processes
from vlfuse.model import TRAINABLE_TOWERS, VLFuseModel
from vlfuse.schema import Config, ConfigError, shown_yaml
from vlfuse.tasks import Task, get_task
from vlfuse.tracking import JsonlWriter, PeakMemory
from vlfuse.training.data import MapData, StreamData, build_eval_loaders, build_train_data
from vlfuse.training.speed import (
    compile_parts,
    compiler_available,
    optimizer_options,
    reuse_freed_cpu_memory,
    use_channels_last,
)


def build_accelerator(cfg: Config) -> Accelerator:
    output_dir = Path(cfg.train.output_dir)
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=cfg.train.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # Epoch-seeded shuffling: the data order is a function of (seed, epoch), so a resumed run can
        # replay it exactly and skip what it already saw.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def set_cpu_threads(accelerator: Accelerator, threads: int | None) -> None:
    """Uses the machine's cores on a CPU run: ``threads``, or cores / processes on this machine."""
    if accelerator.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(local, 1)))


def default_workers(accelerator: Accelerator) -> int:
    """``data.num_workers`` when unset: none when the CPU computes (workers would take the cores of its
    compute threads; measured in docs/benchmarks.md), else up to 4 per process, leaving it one core."""
    if accelerator.device.type == "cpu":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(0, min(4, (os.cpu_count() or 1) // max(local, 1) - 1))


def start_run(cfg: Config, task: Task) -> tuple[Accelerator, Path]:
    """The accelerator (CPU threads set) and the output folder, with the resolved ``config.yaml`` in it
    (after the task's ``prepare``, which may fill in settings from the data, such as the answer
    vocabulary)."""
    accelerator = build_accelerator(cfg)
    use_fsdp_on_cpu_processes(accelerator)
    set_cpu_threads(accelerator, cfg.train.cpu_threads)
    if cfg.data.num_workers is None:
        cfg.data.num_workers = default_workers(accelerator)
    task.prepare(cfg, accelerator)
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(shown_yaml(cfg))
    return accelerator, output_dir


def build_model(cfg: Config, check_task: bool = True) -> VLFuseModel:
    """The model of ``cfg.model``: built from the encoders, or loaded from ``model.init_from`` (whose
    task must be ``model.task`` when ``check_task``)."""
    if cfg.model.init_from:
        # The user's own config decides about custom code, never the folder being loaded.
        model = VLFuseModel.from_pretrained(
            cfg.model.init_from, trust_remote_code=cfg.model.text_encoder.trust_remote_code
        )
        if check_task and model.config.task != cfg.model.task:
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} is a {model.config.task!r} model, but "
                f"model.task={cfg.model.task!r}; use that task's recipe and config"
            )
        model.set_trainable_encoders(cfg.model.trainable_encoders)
        return model
    return VLFuseModel(cfg.model)


def towers_served_by_cache(cfg: Config, accelerator: Accelerator) -> list[str]:
    """The frozen towers whose every feature (training and evaluation) comes from the feature cache: they
    stay on the CPU, never run, and take no accelerator memory. None under FSDP and DeepSpeed, which
    shard and place the whole model themselves."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if not cfg.train.cache_features or sharded:
        return []
    return [
        tower for tower in ("image", "text") if tower not in TRAINABLE_TOWERS[cfg.model.trainable_encoders]
    ]


def prepare_model(accelerator: Accelerator, cfg: Config, model: VLFuseModel, optimizer, train_loader):
    """``accelerator.prepare`` for the model, optimizer and train loader, leaving the towers the cache
    serves on the CPU (DDP is told to ignore their weights, which it would otherwise broadcast). A stream's
    loader is not prepared: each process already reads its own part (``split_dataset_by_node``)."""
    on_cpu = towers_served_by_cache(cfg, accelerator)
    if cfg.data.streaming:
        return (*accelerator.prepare(model, optimizer), train_loader)
    if not on_cpu:
        return accelerator.prepare(model, optimizer, train_loader)
    model.place(accelerator.device, keep_on_cpu=on_cpu)
    ignore_in_ddp(model, model.tower_state_names(on_cpu))
    accelerator.print(
        f"the feature cache serves the frozen {' and '.join(on_cpu)} tower(s): left on the CPU, never run"
    )
    return accelerator.prepare(model, optimizer, train_loader, device_placement=[False, True, True])


@dataclass
class Run:
    """The prepared objects of one training run, its log writers and tracker; fixed once the loop starts."""

    cfg: Config
    accelerator: Accelerator
    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    eval_loaders: dict[str, DataLoader]
    output_dir: Path
    wall_start: float
    frozen: FrozenWeights
    data: MapData | StreamData
    total_steps: int
    memory: PeakMemory
    on_eval: Callable[[int, dict[str, dict[str, float]]], bool] | None = field(default=None, init=False)
    metrics_log: JsonlWriter = field(init=False)
    train_log: JsonlWriter = field(init=False)

    def __post_init__(self) -> None:
        self.metrics_log = JsonlWriter(self.output_dir / "metrics.jsonl", self.accelerator)
        self.train_log = JsonlWriter(self.output_dir / "train_log.jsonl", self.accelerator)


@dataclass
class TrainState:
    """Where the loop is; ``step``, ``epoch`` and ``counters`` go into every checkpoint."""

    step: int = 0
    epoch: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"seen": 0, "bad_rows": 0, "skipped_steps": 0})
    consecutive_bad: int = 0  # optimizer steps in a row skipped for a NaN/inf loss or gradient
    last_loss: float = math.nan
    last_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stop_requested: bool = False  # train()'s on_eval asked to stop after an evaluation


def build_optimizer_and_scheduler(cfg: Config, model: VLFuseModel, total_steps: int):
    """AdamW over the trainable parameters only (frozen towers are left out), and the warm-up + cosine
    schedule, stepped by hand once per optimizer step (its length is in optimizer steps on any number of
    processes; its state travels as JSON in ``trainer_state.json``, no pickle to load back)."""
    groups = model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, **optimizer_options(params, cfg.train.fused_optimizer))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)


def speed_up(cfg: Config, accelerator: Accelerator, model: VLFuseModel) -> None:
    """``train.reuse_cpu_memory`` for the process; ``train.channels_last`` and ``train.compile`` on the
    model, before it is prepared (neither under FSDP/DeepSpeed, which shard the weights themselves).
    Towers the feature cache serves are not compiled: they never run."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if cfg.train.reuse_cpu_memory:
        why_not = reuse_freed_cpu_memory()
        accelerator.print(
            "freed CPU memory kept for reuse (train.reuse_cpu_memory)"
            if why_not is None
            else f"train.reuse_cpu_memory=true, but not applied: {why_not}"
        )
    if cfg.train.channels_last and not sharded and (parts := use_channels_last(model)):
        accelerator.print(f"channels-last memory order for {', '.join(parts)} (train.channels_last)")
    if not cfg.train.compile:
        return
    why_not = "the model is sharded (FSDP/DeepSpeed)" if sharded else compiler_available(accelerator.device)
    if why_not:
        accelerator.print(f"train.compile=true, but torch.compile is not used: {why_not}; running eager")
        return
    cached = towers_served_by_cache(cfg, accelerator)
    parts = [p for p in ("image_encoder", "text_encoder", "fusion", "head") if p.split("_")[0] not in cached]
    compile_parts(model, parts)
    exact = "" if cfg.train.deterministic else "; not bitwise reproducible without train.deterministic=true"
    accelerator.print(f"torch.compile: {', '.join(parts)} (the first steps compile them{exact})")


def set_up_run(cfg: Config) -> Run:
    """Everything the loop needs, prepared: accelerator and output folder, model (frozen weights
    fingerprinted for slim checkpoints), train and evaluation data, optimizer and scheduler."""
    wall_start = time.perf_counter()
    task = get_task(cfg.model.task)
    accelerator, output_dir = start_run(cfg, task)
    if cfg.train.contrastive_chunk_size and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "train.contrastive_chunk_size: gradient caching back-propagates once per chunk, and DeepSpeed's "
            "engine steps the optimizer at every backward; use DDP or FSDP, or unset it"
        )
    memory = PeakMemory(accelerator.device)
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)
    model = build_model(cfg)
    if cfg.train.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    frozen = FrozenWeights(model)  # slim checkpoints: the frozen weights are fingerprinted, not saved
    frozen.attach(accelerator)
    data = build_train_data(accelerator, cfg, task, model)
    eval_loaders = build_eval_loaders(accelerator, cfg, task, model)
    total_steps = data.total_steps(cfg)
    speed_up(cfg, accelerator, model)
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, total_steps)
    model, optimizer, data.loader = prepare_model(accelerator, cfg, model, optimizer, data.loader)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    return Run(
        cfg,
        accelerator,
        task,
        model,
        optimizer,
        scheduler,
        eval_loaders,
        output_dir,
        wall_start,
        frozen=frozen,
        data=data,
        total_steps=total_steps,
        memory=memory,
    )
