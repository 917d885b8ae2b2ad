"""The one Accelerate training and evaluation loop that every recipe shares.

``train(cfg)`` reads top to bottom: set-up (accelerator, model, data, optimizer, scheduler), resume, the
epoch/step loop with periodic evaluation and checkpoints, then the final save and summary. The task
(``vlfuse.tasks``) supplies the data, loss and metrics; checkpoint I/O is in ``vlfuse.checkpointing``,
throughput, memory and log writers in ``vlfuse.tracking``. A run writes ``output_dir``:

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one JSON object per evaluation of a split;
- ``train_log.jsonl``: training loss, learning rate and throughput every ``train.log_every`` steps;
- ``checkpoints/step_<N>/``: resumable state (``accelerator.save_state`` + ``trainer_state.json``);
- ``final/``: the trained model (``VLFuseModel.save_pretrained``);
- ``summary.json``: steps, throughput, peak memory, time split, bad data and skipped steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    send_to_device,
    set_seed,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from vlfuse.checkpointing import (
    CheckpointError,
    FrozenWeights,
    list_checkpoints,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from vlfuse.config import Config, ConfigError, to_yaml
from vlfuse.data.examples import ImageTextDataset
from vlfuse.data.feature_cache import cached_dataset
from vlfuse.data.loading import DataError, stream_split
from vlfuse.data.streaming import StreamedExamples, split_stream, stream_loader
from vlfuse.hub import push_folder
from vlfuse.model import TRAINABLE_TOWERS, VLFuseModel
from vlfuse.schema import to_dict
from vlfuse.tasks import Task, get_task
from vlfuse.tracking import JsonlWriter, LossWindow, PeakMemory, Progress, Throughput

# Bad-data fraction is judged only once this many examples were seen (a few bad rows early on are noise).
MIN_EXAMPLES_FOR_BAD_FRACTION = 50


class TrainingError(RuntimeError):
    """Training cannot go on: too much bad data, or the loss keeps diverging."""


# Errors whose message is the whole story: recipes print them without a stack trace.
USER_ERRORS = (ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError)


# ----------------------------------------------------------------------------------------------- set-up
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


def use_fsdp_on_cpu_processes(accelerator: Accelerator) -> None:
    """Makes an FSDP launch config shard when the processes run on the CPU.

    Accelerate 1.15 turns a launch with ``distributed_type: FSDP`` into FSDP only for GPU-like devices; on
    CPU processes (``use_cpu: true`` / ``ACCELERATE_USE_CPU=1``) its state stays ``MULTI_CPU`` and
    ``prepare`` wraps the model in DDP: every process would hold the whole model, gradients and optimizer
    state. PyTorch's FSDP2 (``fully_shard``) runs on gloo CPU processes, so here the state is switched to
    FSDP with the plugin the launcher described (its ``FSDP_*`` variables), as Accelerate does on GPUs.

    Raises:
        ConfigError: an FSDP1 config on CPU processes (use ``fsdp_version: 2``).
    """
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's environment
    if plugin.fsdp_version != 2:
        raise ConfigError(
            "FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
            "(recipes/configs/accelerate/cpu_2proc_fsdp.yaml)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.print("FSDP2 on CPU processes: parameters, gradients and optimizer state are sharded (gloo)")


def set_cpu_threads(accelerator: Accelerator, threads: int | None) -> None:
    """Uses the machine's cores on a CPU run: ``threads``, or cores / processes on this machine."""
    if accelerator.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(local, 1)))


def start_run(cfg: Config, task: Task) -> tuple[Accelerator, Path]:
    """The accelerator (CPU threads set) and the output folder, with the resolved ``config.yaml`` in it
    (after the task's ``prepare``, which may fill in settings from the data, such as the answer
    vocabulary)."""
    accelerator = build_accelerator(cfg)
    use_fsdp_on_cpu_processes(accelerator)
    set_cpu_threads(accelerator, cfg.train.cpu_threads)
    task.prepare(cfg, accelerator)
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
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


def eval_splits(cfg: Config) -> list[str]:
    """``data.eval_split`` as a list."""
    split = cfg.data.eval_split
    return list(split) if isinstance(split, list | tuple) else [split]


def make_loader(dataset, cfg: Config, collate, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        drop_last=shuffle,
        # Not persistent: workers get a fresh copy of the dataset, with its epoch, every epoch.
        persistent_workers=False,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed run
        # (which starts one more iterator) would see different dropout masks than a straight one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def build_split(accelerator: Accelerator, cfg: Config, task: Task, model, split: str, train: bool):
    """The task's dataset of one split; with ``train.cache_features``, reading its frozen towers'
    features from the cache (computed first if needed)."""
    with accelerator.main_process_first():
        dataset = task.build_dataset(cfg, model, split, train=train)
    if cfg.train.cache_features:
        batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
        dataset = task.with_cache(
            dataset,
            lambda base: cached_dataset(
                model, base, split, cfg.train.cache_dir, cfg.train.cache_dtype, batch_size, accelerator
            ),
        )
    accelerator.print(f"{'train' if train else 'eval'} split {split}: {dataset.describe()}")
    return dataset


def build_train_data(accelerator: Accelerator, cfg: Config, task: Task, model) -> MapData | StreamData:
    """The train split and its loader: map-style (shuffled by a seeded sampler), or with
    ``data.streaming`` read as a stream, this process's part of it."""
    split = cfg.data.train_split
    collate = task.collator(model, train=True)
    if cfg.data.streaming:
        with accelerator.main_process_first():
            dataset = build_stream(cfg, task, model, accelerator.process_index, accelerator.num_processes)
        accelerator.print(f"train split {split}: {dataset.describe()}")
        loader = stream_loader(dataset, cfg.train.batch_size, collate, cfg.data.num_workers)
        return StreamData(dataset, loader, accelerator)
    train_set = build_split(accelerator, cfg, task, model, split, train=True)
    if len(train_set) < cfg.train.batch_size:
        raise ValueError(
            f"the train split has {len(train_set)} examples, "
            f"fewer than train.batch_size={cfg.train.batch_size}"
        )
    loader = make_loader(train_set, cfg, collate, cfg.train.batch_size, shuffle=True)
    return MapData(train_set, loader, accelerator, cfg.train.gradient_accumulation_steps)


def build_stream(cfg: Config, task: Task, model, rank: int, world_size: int) -> StreamedExamples:
    """Process ``rank``'s part of the streamed train split (``data.streaming``), its examples made by the
    task's dataset over the stream's first rows."""
    split = cfg.data.train_split
    template = task.build_dataset(cfg, model, split, train=True)
    if not isinstance(template, ImageTextDataset):
        raise ConfigError(f"data.streaming=true: model.task={task.name} cannot stream its train split")
    stream = stream_split(cfg.data, split)
    if cfg.data.max_train_samples is not None:
        stream = stream.take(cfg.data.max_train_samples)
    stream = split_stream(stream, rank, world_size)
    return StreamedExamples(stream, template, cfg.data.shuffle_buffer, rank, cfg.train.seed)


@dataclass
class MapData:
    """A map-style train split: epochs of a known length; a resumed epoch skips the batches it saw."""

    dataset: Any
    loader: DataLoader
    accelerator: Accelerator
    accum: int

    def describe(self) -> str:
        return f"{len(self.dataset):,} train examples"

    def total_steps(self, cfg: Config) -> int:
        return cfg.train.max_steps or self.steps_per_epoch() * cfg.train.epochs

    def steps_per_epoch(self) -> int:
        return max(1, len(self.loader) // self.accum)

    def start(self, state: TrainState) -> None:
        state.epoch = state.step // self.steps_per_epoch()

    def epoch_batches(self, state: TrainState):
        """The batches of epoch ``state.epoch`` still to see."""
        self.loader.set_epoch(state.epoch)
        self.dataset.set_epoch(state.epoch)
        skip = (state.step - state.epoch * self.steps_per_epoch()) * self.accum
        return self.accelerator.skip_first_batches(self.loader, skip) if skip > 0 else self.loader

    def end_epoch(self, state: TrainState) -> None:
        state.epoch += 1

    def save(self, folder: Path) -> None:
        """Nothing: the position is a function of the step (seeded order)."""

    def load(self, folder: Path) -> None:
        """Nothing: see ``save``."""


STREAM_STATE = "stream_position_{rank}.pt"


@dataclass
class StreamData:
    """A streamed train split: passes of unknown length, per process (processes may start a new pass at
    different steps); the position of every process is saved in checkpoints and restored on resume."""

    dataset: StreamedExamples
    loader: Any  # torchdata StatefulDataLoader
    accelerator: Accelerator
    epoch: int = 0
    pass_ended: bool = False
    resumed: bool = False  # the next pass continues a checkpoint's

    def describe(self) -> str:
        return "a streamed train split"

    def total_steps(self, cfg: Config) -> int:
        return cfg.train.max_steps  # required with data.streaming (config check)

    def start(self, state: TrainState) -> None:
        state.epoch = self.epoch

    def epoch_batches(self, state: TrainState):
        """The rest of this pass over the stream, moved to the device."""
        self.dataset.set_epoch(self.epoch)
        resumed, self.resumed = self.resumed, False
        self.pass_ended, seen = False, 0
        for batch in self.loader:
            seen += 1
            yield send_to_device(batch, self.accelerator.device)
        self.pass_ended = True
        if seen == 0 and not resumed:  # (a pass resumed at its very end has nothing left: fine)
            raise DataError(
                f"a pass over the streamed train split gave process {self.accelerator.process_index} no "
                "full batch: its part of the stream is smaller than train.batch_size"
            )

    def end_epoch(self, state: TrainState) -> None:
        """The next pass, if this one ended (not when the loop stopped inside it)."""
        if self.pass_ended:
            self.epoch += 1
        state.epoch = self.epoch

    def save(self, folder: Path) -> None:
        """Writes this process's stream position into the checkpoint ``folder``."""
        rank = self.accelerator.process_index
        state = {
            "epoch": self.epoch,
            "num_workers": self.loader.num_workers,
            "loader": self.loader.state_dict(),
        }
        torch.save(state, folder / STREAM_STATE.format(rank=rank))

    def load(self, folder: Path) -> None:
        """Continues from the position saved in the checkpoint ``folder``.

        Raises:
            CheckpointError: no position for this process, or one saved with other DataLoader workers.
        """
        path = folder / STREAM_STATE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the checkpoint has no stream position for process "
                f"{self.accelerator.process_index} (was it saved without data.streaming, or with fewer "
                "processes?)"
            )
        state = torch.load(path, weights_only=True)
        if state["num_workers"] != self.loader.num_workers:
            raise CheckpointError(
                f"{path} was saved with data.num_workers={state['num_workers']}; resume a stream with the "
                f"same number of workers (now {self.loader.num_workers})"
            )
        self.epoch = int(state["epoch"])  # epoch_batches hands it to the dataset
        self.loader.load_state_dict(state["loader"])
        self.resumed = True


def build_eval_loaders(accelerator: Accelerator, cfg: Config, task: Task, model) -> dict[str, DataLoader]:
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    collate = task.collator(model, train=False)
    return {
        split: make_loader(
            build_split(accelerator, cfg, task, model, split, False), cfg, collate, batch_size, False
        )
        for split in eval_splits(cfg)
    }


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


def accelerator_weights_mib(model: torch.nn.Module, device: torch.device) -> float | None:
    """MiB of weights and buffers held in accelerator memory (None on a CPU run)."""
    if device.type == "cpu":
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type) / 2**20


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
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, model.tower_state_names(on_cpu)
    )
    accelerator.print(
        f"the feature cache serves the frozen {' and '.join(on_cpu)} tower(s): left on the CPU, never run"
    )
    return accelerator.prepare(model, optimizer, train_loader, device_placement=[False, True, True])


def held_state_mib(model: torch.nn.Module, optimizer) -> float:
    """MiB of parameters and optimizer state this process holds (under FSDP its shards only)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard

    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors = [local(t) for t in [*model.parameters(), *states]]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def format_metrics(results: dict[str, dict[str, Any]]) -> str:
    """One line per split: ``validation: acc@0.5=0.9746, ...``."""
    return "\n".join(
        f"{split}: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        for split, values in results.items()
    )


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(accelerator: Accelerator, model, task: Task, loader: DataLoader) -> dict[str, float]:
    """Metrics over the whole split on any number of processes: per-example values are gathered (the
    duplicates added to even out the processes are dropped) before reduction. Unusable rows are masked
    out (the task's ``valid`` value) and reported as ``bad_rows``."""
    was_training = model.training
    model.eval()
    values: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in loader:
        batch.pop("bad_rows")
        outputs = model(**batch)
        gathered = accelerator.gather_for_metrics(task.eval_values(outputs, batch))
        for k, v in gathered.items():
            values[k].append(v.detach().float().cpu())
    model.train(was_training)
    values = {k: torch.cat(v) for k, v in values.items()}
    metrics = task.metrics(values)
    # Counted from the gathered mask: a bad row that Accelerate repeats to even out the last batches is
    # dropped with the other repeats, so it counts once (a per-process count would count it twice).
    metrics["bad_rows"] = int((values["valid"] == 0).sum().item())
    return metrics


# --------------------------------------------------------------------------------------- the train loop
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


@dataclass
class StepOutcome:
    """One micro-step: its loss, whether it was finite, and whether the optimizer stepped."""

    loss: torch.Tensor
    loss_ok: torch.Tensor
    stepped: bool
    examples: int
    bad_rows: torch.Tensor


def train(
    cfg: Config, on_end: Callable[[Accelerator, torch.nn.Module], None] | None = None
) -> dict[str, dict]:
    """Trains ``cfg.model`` on ``cfg.data`` as ``cfg.train`` says; returns the last metrics per split.

    Args:
        cfg: the whole config.
        on_end: called on every process with the accelerator and the prepared model after training
            (for inspection in tests and notebooks).

    Raises:
        TrainingError: more than ``data.max_bad_fraction`` of the examples are unusable, or
            ``train.max_bad_steps`` optimizer steps in a row had a NaN/inf loss or gradient.
    """
    wall_start = time.perf_counter()
    task = get_task(cfg.model.task)
    accelerator, output_dir = start_run(cfg, task)
    memory = PeakMemory(accelerator.device)
    set_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.train.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    frozen = FrozenWeights(model)  # slim checkpoints: the frozen weights are fingerprinted, not saved
    frozen.attach(accelerator)
    data = build_train_data(accelerator, cfg, task, model)
    eval_loaders = build_eval_loaders(accelerator, cfg, task, model)
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay)
    )
    model, optimizer, data.loader = prepare_model(accelerator, cfg, model, optimizer, data.loader)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    total_steps = data.total_steps(cfg)
    # Stepped by hand once per optimizer step, so its length is in optimizer steps on any process count;
    # its state travels as JSON in trainer_state.json (no pickle to load back).
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)
    run = Run(
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
    )
    state = resume(run)
    counts = announce(run, data.describe(), total_steps)

    meter, window = Throughput(), LossWindow(accelerator.device)
    progress = Progress(total_steps, state.step, enabled=accelerator.is_local_main_process)
    model.train()
    data.start(state)
    while state.step < total_steps:
        for batch in meter.batches(data.epoch_batches(state)):
            outcome = train_step(run, batch, meter)
            window.add(outcome.loss, outcome.loss_ok, outcome.examples, outcome.bad_rows)
            meter.add_samples(outcome.examples * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            if not outcome.stepped:
                count_skipped_step(run, state, outcome)
                continue
            state.consecutive_bad = 0
            scheduler.step()
            state.step += 1
            progress.update(1)
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                log_training(run, state, window.reduce(accelerator), meter.window_rate(), progress)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                evaluate_during_training(run, state, meter)
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                checkpoint(run, state)
            if state.step >= total_steps:
                break
        # A stream evaluates by steps only (and at the end): processes end their passes at different steps.
        if not cfg.train.eval_every and not cfg.data.streaming:
            evaluate_during_training(run, state, meter)
        data.end_epoch(state)
    progress.close()
    # Throughput covers the training loop only: not the final evaluation, checkpoint and model save below.
    rate = meter.steady_rate(time.perf_counter(), meter.eval)
    finish(run, state, meter, rate, memory, counts)
    if on_end is not None:
        on_end(accelerator, model)
    accelerator.end_training()
    return state.last_metrics


def resume(run: Run) -> TrainState:
    """The loop's state: fresh, or restored from ``train.resume_from`` (with the prepared objects)."""
    state = TrainState()
    saved = restore_checkpoint(run.accelerator, run.cfg.train, run.output_dir, run.frozen)
    if saved is not None:
        run.data.load(Path(saved["path"]))
        run.scheduler.load_state_dict(saved["scheduler"])
        state.step = int(saved["step"])
        state.counters.update(saved.get("counters", {}))
    return state


def tracker_config(cfg: Config, per_part: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The run's hyperparameters for the trackers: the whole resolved config flattened to dotted keys
    (``model.image_encoder.name``, ...), and the trainable / frozen parameter count of each part
    (``parameters.image_encoder.trainable``, ...). Values are scalars (lists, dicts and None as text), which
    every tracker accepts."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", to_dict(cfg))
    walk("parameters", per_part)
    return flat


def announce(run: Run, train_data: str, total_steps: int) -> dict[str, Any]:
    """Prints what will train, per tower; returns the parameter counts (total and per part)."""
    per_part = run.accelerator.unwrap_model(run.model).parameter_counts()
    n_train = sum(c["trainable"] for c in per_part.values())
    n_frozen = sum(c["frozen"] for c in per_part.values())
    model_cfg = run.cfg.model
    tuning = {"image_encoder": model_cfg.image_encoder.tuning, "text_encoder": model_cfg.text_encoder.tuning}
    parts = "; ".join(
        f"{part}{f' ({tuning[part]})' if part in tuning and c['trainable'] else ''}: "
        f"{c['trainable']:,} trainable, {c['frozen']:,} frozen"
        for part, c in per_part.items()
    )
    image, text = model_cfg.image_encoder, model_cfg.text_encoder
    run.accelerator.print(
        f"image encoder {image.name} (image_size {image.image_size}, kwargs {dict(image.kwargs)}); "
        f"text encoder {text.name} (max_length {text.max_length}); fusion {model_cfg.fusion.name}"
    )
    if run.cfg.train.log_with:
        run.accelerator.init_trackers(run.output_dir.name, config=tracker_config(run.cfg, per_part))
    run.accelerator.print(
        f"trainable_encoders={model_cfg.trainable_encoders}: {n_train:,} trainable, {n_frozen:,} frozen "
        f"parameters ({parts}); {train_data}, {total_steps} steps, "
        f"{run.accelerator.num_processes} process(es)"
    )
    return {"trainable": n_train, "frozen": n_frozen, "per_part": per_part}


@torch.no_grad()
def broadcast_training_buffers(model: torch.nn.Module) -> None:
    """Copies process 0's buffers of the modules in training mode (BatchNorm statistics) to every process,
    as DDP does before each forward; under FSDP the loop calls it before each forward and before each
    checkpoint. FSDP shards parameters, not buffers, and would let each process keep statistics of its
    own batches, of which a checkpoint saves one copy (from any process) and ``final/`` process 0's: a
    resumed run would then differ from an uninterrupted one."""
    buffers = [b for m in model.modules() if m.training for b in m.buffers(recurse=False)]
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every process
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for b in group:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def train_step(run: Run, batch: dict[str, torch.Tensor], meter: Throughput) -> StepOutcome:
    """Forward, backward and (on the last micro-step of an accumulation) gradient clipping and the
    optimizer step, unless the gradient is not finite."""
    start = time.perf_counter()
    accelerator, model = run.accelerator, run.model
    if accelerator.distributed_type == DistributedType.FSDP:
        broadcast_training_buffers(model)
    n_bad = batch.pop("bad_rows")
    n_good = batch["valid"].shape[0]
    with accelerator.accumulate(model):
        outputs = model(**batch)
        loss, _ = run.task.loss(outputs, batch)
        accelerator.backward(loss)
        stepped = False
        loss_ok = torch.isfinite(loss.detach())
        if accelerator.sync_gradients:
            # A NaN/inf loss on any rank makes the all-reduced gradient non-finite on every rank, so all
            # ranks skip the same step without an extra collective.
            norm = accelerator.clip_grad_norm_(
                model.parameters(), run.cfg.train.max_grad_norm or float("inf")
            )
            if accelerator.mixed_precision == "fp16":  # the loss scaler skips overflowing steps itself
                run.optimizer.step()
                stepped = not accelerator.optimizer_step_was_skipped
            elif torch.isfinite(norm):
                run.optimizer.step()
                stepped = True
        run.optimizer.zero_grad(set_to_none=True)
    meter.step += time.perf_counter() - start
    return StepOutcome(loss.detach(), loss_ok, stepped, n_good, n_bad)


def divergence_hint(task: Task) -> str:
    return (
        "likely causes: a learning rate too high (train.lr / train.encoder_lr), fp16 overflow "
        "(try train.mixed_precision=bf16 or no), no gradient clipping (train.max_grad_norm), or bad labels "
        f"({task.data_hint})"
    )


def count_skipped_step(run: Run, state: TrainState, outcome: StepOutcome) -> None:
    """Counts an optimizer step skipped for a NaN/inf loss or gradient; too many in a row stop the run."""
    state.counters["skipped_steps"] += 1
    state.consecutive_bad += 1
    fp16_overflow = run.accelerator.mixed_precision == "fp16" and bool(outcome.loss_ok)
    if state.consecutive_bad >= run.cfg.train.max_bad_steps and not fp16_overflow:
        raise TrainingError(
            f"{state.consecutive_bad} optimizer steps in a row had a NaN/inf loss or gradient "
            f"(at step {state.step}); stopping. {divergence_hint(run.task)}"
        )


def log_training(
    run: Run, state: TrainState, totals: dict[str, float], rate: float, progress: Progress
) -> None:
    """Counts the window's examples and bad rows (stopping on too much bad data) and logs loss, learning
    rate and samples/s."""
    counters = state.counters
    counters["seen"] += int(totals["examples"])
    counters["bad_rows"] += int(totals["bad_rows"])
    if counters["seen"] >= MIN_EXAMPLES_FOR_BAD_FRACTION:
        fraction = counters["bad_rows"] / counters["seen"]
        limit = run.cfg.data.max_bad_fraction
        if fraction > limit:
            raise TrainingError(
                f"{counters['bad_rows']:,} of {counters['seen']:,} training examples ({fraction:.1%}) are "
                f"unusable ({run.task.bad_rows}), more than data.max_bad_fraction={limit}; "
                f"{run.task.data_hint}"
            )
    state.last_loss = totals["loss_sum"] / max(totals["finite_steps"], 1.0)
    lr = run.scheduler.get_last_lr()[0]
    progress.report(state.step, state.last_loss, lr, rate)
    run.train_log.write({"step": state.step, "loss": state.last_loss, "lr": lr, "samples_per_s": rate})
    if run.cfg.train.log_with:
        run.accelerator.log({"train/loss": state.last_loss, "train/lr": lr}, step=state.step)


def evaluate_during_training(run: Run, state: TrainState, meter: Throughput) -> None:
    """Evaluates every eval split, appends the records to ``metrics.jsonl`` and the tracker."""
    start = time.perf_counter()
    for split, loader in run.eval_loaders.items():
        metrics = evaluate(run.accelerator, run.model, run.task, loader)
        state.last_metrics[split] = metrics
        record = {"step": state.step, "epoch": state.epoch, "split": split, **metrics}
        record["time_s"] = round(time.perf_counter() - run.wall_start, 3)  # since the run started
        record["train_bad_rows"] = state.counters["bad_rows"]
        record["skipped_steps"] = state.counters["skipped_steps"]
        run.metrics_log.write(record, echo=True)
        if run.cfg.train.log_with:
            run.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=state.step)
    meter.eval += time.perf_counter() - start


def checkpoint(run: Run, state: TrainState) -> None:
    if run.accelerator.distributed_type == DistributedType.FSDP:
        broadcast_training_buffers(run.model)  # one copy is saved: make it every process's
    trainer_state = {
        "step": state.step,
        "epoch": state.epoch,
        "num_processes": run.accelerator.num_processes,
        "batch_size": run.cfg.train.batch_size,
        "scheduler": run.scheduler.state_dict(),
        "counters": state.counters,
        "frozen_weights": run.frozen.record,
    }
    save_checkpoint(
        run.accelerator, run.output_dir, trainer_state, run.cfg.train.keep_last, per_process=run.data.save
    )


def finish(
    run: Run, state: TrainState, meter: Throughput, rate: float, memory: PeakMemory, counts: dict[str, Any]
) -> None:
    """The last evaluation and checkpoint (unless the loop just wrote them), ``final/`` and
    ``summary.json``."""
    cfg, accelerator = run.cfg, run.accelerator
    # Unless the loop just evaluated (every eval_every steps, or at the end of each epoch).
    if state.step % cfg.train.eval_every != 0 if cfg.train.eval_every else cfg.data.streaming:
        evaluate_during_training(run, state, meter)
    if not cfg.train.checkpoint_every or state.step % cfg.train.checkpoint_every != 0:
        checkpoint(run, state)
    peak_mb = memory.stop_mb()
    # Every process's own figures (a collective): what sharding (FSDP) saves shows per process.
    mine = torch.tensor([peak_mb, held_state_mib(run.model, run.optimizer)], device=accelerator.device)
    peaks, held = accelerator.gather(mine[None]).T.tolist()
    summary = {
        "trainable_encoders": cfg.model.trainable_encoders,
        "steps": state.step,
        "samples": meter.samples,
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - run.wall_start,
        "train_samples_per_s": rate,
        "peak_memory_mb": peak_mb,
        "peak_memory_mb_per_process": [round(p, 1) for p in peaks],
        "weights_and_optimizer_mib_per_process": [round(h, 1) for h in held],
        "peak_memory_kind": memory.kind,
        "trainable_parameters": counts["trainable"],
        "frozen_parameters": counts["frozen"],
        "parameters": counts["per_part"],
        "tuning": {"image": cfg.model.image_encoder.tuning, "text": cfg.model.text_encoder.tuning},
        "towers_served_by_cache": towers_served_by_cache(cfg, accelerator),
        "accelerator_weights_mib": accelerator_weights_mib(run.model, accelerator.device),
        "last_loss": state.last_loss,
        "time_data_s": meter.data,
        "time_step_s": meter.step,
        "time_eval_s": meter.eval,
        **state.counters,
        "metrics": state.last_metrics,
    }
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full_state = (
        accelerator.get_state_dict(run.model) if sharded else None
    )  # a collective: every rank calls it
    if accelerator.is_main_process:
        card = {"config": to_dict(cfg), "summary": summary}
        final = accelerator.unwrap_model(run.model).save_pretrained(
            run.output_dir / "final", state_dict=full_state, run=card
        )
        if cfg.train.push_to_hub:
            push_final(cfg, final, accelerator.print)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.print(
        f"done: {state.step} steps, {meter.samples:,} samples, {rate:.1f} samples/s, peak memory "
        f"{summary['peak_memory_mb']:.0f} MiB ({summary['peak_memory_kind']}); time in data loading "
        f"{meter.data:.1f} s, forward+backward+optimizer {meter.step:.1f} s, evaluation {meter.eval:.1f} s; "
        f"{state.counters['bad_rows']} bad rows skipped, {state.counters['skipped_steps']} steps skipped; "
        f"model in {run.output_dir / 'final'}"
    )


def hub_model_id(cfg: Config) -> str:
    """``train.hub_model_id``, or the run folder's name."""
    return cfg.train.hub_model_id or Path(cfg.train.output_dir).resolve().name


def push_final(cfg: Config, final: Path, log: Callable[[str], None] = print, suffix: str = "") -> str:
    """Uploads ``final/`` to ``train.hub_model_id`` (+ ``suffix``); returns the commit URL."""
    repo_id = hub_model_id(cfg) + suffix
    log(f"pushing {final} to the Hub model repository {repo_id} ...")
    url = push_folder(
        final, repo_id, private=cfg.train.hub_private, commit_message=f"vlfuse: {final.parent.name}"
    )
    log(f"pushed: {url}")
    return url


# -------------------------------------------------------------------------------------- a saved model
def evaluate_saved(cfg: Config) -> dict[str, dict[str, float]]:
    """Scores ``model.init_from`` (a ``final/`` folder or a Hub id) on each of ``data.eval_split``,
    printing the metrics and appending them to ``output_dir/metrics.jsonl``."""
    if not cfg.model.init_from:
        raise ValueError("evaluation needs model.init_from=<a saved model folder or Hub id>")
    model = build_model(cfg, check_task=False)
    cfg.model.task = model.config.task  # the saved model's task decides the data and metrics
    task = get_task(cfg.model.task)
    accelerator, output_dir = start_run(cfg, task)
    loaders = build_eval_loaders(accelerator, cfg, task, model)
    model = accelerator.prepare(model)
    writer = JsonlWriter(output_dir / "metrics.jsonl", accelerator)
    results = {}
    for split, loader in loaders.items():
        results[split] = evaluate(accelerator, model, task, accelerator.prepare(loader))
        record = {"step": None, "epoch": None, "split": split, "model": str(cfg.model.init_from)}
        writer.write({**record, "num_processes": accelerator.num_processes, **results[split]}, echo=True)
    return results


__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "TrainingError",
    "build_model",
    "evaluate",
    "evaluate_saved",
    "format_metrics",
    "list_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "train",
    "verify_checkpoint",
]
