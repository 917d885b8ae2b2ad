"""The training data of a run: the train split, map-style (``MapData``) or streamed (``StreamData``), its
loader and its position in checkpoints; and the evaluation splits' loaders."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from vlfuse.checkpointing import CheckpointError
from vlfuse.data.examples import ImageTextDataset
from vlfuse.data.feature_cache import cached_dataset
from vlfuse.data.loading import DataError, stream_split
from vlfuse.data.mixing import ConcatExamples, MixedCollator, MixedDataset, MixedStream
from vlfuse.data.streaming import StreamedExamples, split_stream, stream_loader
from vlfuse.data.subsets import HOLDOUT, RowView, row_groups, split_rows
from vlfuse.schema import Config, ConfigError
from vlfuse.schema.mixing import Source, sources, training_sources
from vlfuse.tasks import Task

if TYPE_CHECKING:  # the loop's state, for annotations only
    from vlfuse.training.setup import TrainState


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
        num_workers=cfg.data.num_workers or 0,
        drop_last=shuffle,
        # Not persistent: workers get a fresh copy of the dataset, with its epoch, every epoch.
        persistent_workers=False,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed run
        # (which starts one more iterator) would see different dropout masks than a straight one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def build_split(accelerator: Accelerator, cfg: Config, task: Task, model, split: str, train: bool):
    """The task's dataset of one split; with ``train.cache_features``, reading its frozen towers'
    features from the cache (computed first if needed). The train split with ``data.holdout`` or
    ``data.train_subset``, and the split ``holdout``, are parts of the whole train split's dataset (and of
    its one cache)."""
    part = split_part(cfg, split, train)
    source = cfg.data.train_split if part else split
    if part == HOLDOUT:  # the held-out rows are drawn from the train split as training reads it
        cfg = copy.deepcopy(cfg)
        cfg.data.max_eval_samples = cfg.data.max_train_samples
    with accelerator.main_process_first():
        dataset = task.build_dataset(cfg, model, source, train=train)
    if cfg.train.cache_features:
        batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
        dataset = task.over_examples(
            dataset,
            lambda base: cached_dataset(
                model, base, source, cfg.train.cache_dir, cfg.train.cache_dtype, batch_size, accelerator
            ),
        )
    if part:
        dataset = task.over_examples(
            dataset, lambda base: RowView(base, split_rows(cfg.data, row_groups(base))[part], part)
        )
    accelerator.print(f"{'train' if train else 'eval'} split {split}: {dataset.describe()}")
    return dataset


def split_part(cfg: Config, split: str, train: bool) -> str | None:
    """Which part of the train split a split is: ``train`` (training with ``data.holdout`` or
    ``data.train_subset``), ``holdout`` (its held-out rows), or None (a split read whole)."""
    if train:
        return "train" if cfg.data.holdout or cfg.data.train_subset is not None else None
    return HOLDOUT if split == HOLDOUT and cfg.data.holdout else None


def build_train_data(accelerator: Accelerator, cfg: Config, task: Task, model) -> MapData | StreamData:
    """The train split and its loader: map-style (shuffled by a seeded sampler), or with
    ``data.streaming`` read as a stream, this process's part of it; with ``data.datasets``, every
    source's train split mixed by weight (``vlfuse.data.mixing``)."""
    collate = task.collator(model, train=True)
    mixed = training_sources(cfg.data) if cfg.data.datasets else None
    if mixed:
        collate = MixedCollator(collate, len(mixed))
    if cfg.data.streaming:
        with accelerator.main_process_first():
            dataset = build_stream_data(
                cfg, task, model, accelerator.process_index, accelerator.num_processes
            )
        accelerator.print(f"train split {cfg.data.train_split}: {dataset.describe()}")
        loader = stream_loader(dataset, cfg.train.batch_size, collate, cfg.data.num_workers or 0)
        return StreamData(dataset, loader, accelerator, source_names=mixed_names(mixed))
    if mixed:
        parts = [
            (s.name, build_split(accelerator, s.config(cfg), task, model, s.data.train_split, True))
            for s in mixed
        ]
        train_set = MixedDataset(parts, [s.weight for s in mixed], cfg.data.mix_stopping, cfg.train.seed)
        accelerator.print(f"train split, mixed: {train_set.describe()}")
    else:
        train_set = build_split(accelerator, cfg, task, model, cfg.data.train_split, train=True)
    if len(train_set) < cfg.train.batch_size:
        raise ValueError(
            f"the train split has {len(train_set)} examples, "
            f"fewer than train.batch_size={cfg.train.batch_size}"
        )
    loader = make_loader(train_set, cfg, collate, cfg.train.batch_size, shuffle=True)
    return MapData(train_set, loader, accelerator, cfg.train.gradient_accumulation_steps, mixed_names(mixed))


def mixed_names(mixed: list[Source] | None) -> list[str]:
    return [s.name for s in mixed] if mixed else []


def build_stream_data(cfg: Config, task: Task, model, rank: int, world_size: int):
    """Process ``rank``'s part of the streamed train split, or of every source's mixed by weight."""
    if not cfg.data.datasets:
        return build_stream(cfg, task, model, rank, world_size)
    mixed = training_sources(cfg.data)
    parts = [(s.name, build_stream(s.config(cfg), task, model, rank, world_size, s.name)) for s in mixed]
    return MixedStream(parts, [s.weight for s in mixed], cfg.data.mix_stopping, rank, cfg.train.seed)


def build_stream(
    cfg: Config, task: Task, model, rank: int, world_size: int, name: str = ""
) -> StreamedExamples:
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
    return StreamedExamples(stream, template, cfg.data.shuffle_buffer, rank, cfg.train.seed, name)


@dataclass
class MapData:
    """A map-style train split: epochs of a known length; a resumed epoch skips the batches it saw."""

    dataset: Any
    loader: DataLoader
    accelerator: Accelerator
    accum: int
    source_names: list[str] = field(default_factory=list)  # a mixed run's sources (bad rows per source)

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

    dataset: StreamedExamples | MixedStream
    loader: Any  # torchdata StatefulDataLoader
    accelerator: Accelerator
    source_names: list[str] = field(default_factory=list)  # a mixed run's sources (bad rows per source)
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
    """A loader per evaluation split; with ``data.datasets``, per split and source (``<split>[<name>]``)
    and all sources together (``<split>``)."""
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    collate = task.collator(model, train=False)
    datasets = {}
    for split in eval_splits(cfg):
        if cfg.data.datasets:
            datasets.update(build_mixed_eval(accelerator, cfg, task, model, split))
        else:
            datasets[split] = build_split(accelerator, cfg, task, model, split, False)
    return {name: make_loader(ds, cfg, collate, batch_size, False) for name, ds in datasets.items()}


def build_mixed_eval(accelerator: Accelerator, cfg: Config, task: Task, model, split: str) -> dict[str, Any]:
    """Evaluation split ``split`` of every source (a source whose entry sets ``eval_split`` reads its
    own, by position when the run names several), and all of them together: the task's dataset rebuilt
    over every source's examples in turn (``ConcatExamples``)."""
    position = eval_splits(cfg).index(split)
    per_source, bases = {}, []
    every = sources(cfg.data)
    for s in every:
        own = eval_splits(s.config(cfg))
        name = own[min(position, len(own) - 1)]
        dataset = build_split(accelerator, s.config(cfg), task, model, name, False)
        task.over_examples(dataset, lambda base, name=s.name: bases.append((name, base)) or base)
        per_source[f"{split}[{s.name}]"] = dataset
    whole = task.over_examples(per_source[f"{split}[{every[0].name}]"], lambda _: ConcatExamples(bases))
    accelerator.print(f"eval split {split}: {whole.describe()}")
    return {split: whole, **per_source}
