"""A training split streamed instead of downloaded (``data.streaming=true``).

The split is a ``datasets.IterableDataset`` (``loading.stream_split``: a Hub id, local parquet/JSON/CSV
files, a ``save_to_disk`` folder or the embedded dataset), split between processes by
``datasets.distributed.split_dataset_by_node`` (whole shards per process when the shard count divides
evenly, else every N-th row) and between DataLoader workers by ``datasets`` itself (whole shards per
worker). ``StreamedExamples`` turns its rows into the task's examples with the task's own map-style
dataset (``ImageTextDataset.example``, on a template built from the stream's first rows), so that a
streamed example is the same as the map-style one; images are decoded where examples are made, in the
DataLoader workers.

Shuffling: rows are read in blocks of ``data.shuffle_buffer`` examples, and each block is shuffled with a
generator seeded by (seed, epoch, process, worker, block). Unlike a rolling shuffle buffer (``datasets``'
``IterableDataset.shuffle``, whose buffer is lost on resume), a block can be read again from its start,
so the stream's position is exact and small: the ``datasets`` state at the block's start and how many of
its examples were taken. ``torchdata``'s ``StatefulDataLoader`` collects that position from every worker
with each batch; the training loop saves it per process in every checkpoint, and ``train.resume_from``
continues with the examples an uninterrupted run would have seen next.
"""

from __future__ import annotations

import copy
import hashlib
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from vlfuse.data.examples import ImageTextDataset, Source, texts_of

# torchdata 0.11 calls a deprecated torch function on every iterator; nothing to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def stable_id(*parts: Any) -> int:
    """A 63-bit integer for ``parts``, the same in every process and worker (Python's ``hash`` is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamedExamples(IterableDataset):
    """The examples of a streamed split, made by ``template`` (the task's dataset over the stream's first
    rows) from each streamed row and each of its texts.

    A row without a usable text becomes a ``BadExample`` (``missing_<noun>``): in a stream, the rows
    that a map-style dataset drops and reports up front are counted with the other bad rows instead.

    Args:
        stream: this process's part of the split (``split_stream``).
        template: the task's ``ImageTextDataset`` (training mode), whose ``example`` makes each example.
        buffer_size: examples per shuffled block; 1 reads the stream in order.
        rank: this process's index (keys the shuffle and the examples' image ids).
        seed: ``train.seed``.
        name: the source's name in a mixed run (``data.datasets``): its image ids are its own.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        template: ImageTextDataset,
        buffer_size: int,
        rank: int = 0,
        seed: int = 0,
        name: str = "",
    ) -> None:
        self.stream = stream
        self.ids = (name,) if name else ()
        self.template = template
        self.buffer_size = max(1, buffer_size)
        self.rank, self.seed = rank, seed
        self.epoch = 0
        self.text_column = template.columns[template.TEXT_FIELD]
        self.image_id_column = template.cfg.columns.get("image_id")
        self.position: dict[str, Any] = {"epoch": 0, "block": 0, "block_start": None, "taken": 0}
        self.start: dict[str, Any] | None = None  # where the next pass starts (load_state_dict)

    # ------------------------------------------------------------------------------- position (resume)
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the epoch, the block, the ``datasets`` state at its start and how many of
        its examples were taken."""
        return copy.deepcopy(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next pass starts after the last example taken when ``state`` was saved."""
        self.start = copy.deepcopy(state)
        self.position = copy.deepcopy(state)
        self.epoch = state["epoch"]

    def describe(self) -> str:
        shards = getattr(self.stream, "num_shards", None) or self.stream.n_shards  # n_shards: datasets < 4
        order = f"shuffled in blocks of {self.buffer_size:,}" if self.buffer_size > 1 else "in order"
        first = self.template.describe()
        return f"streamed ({shards} shard(s) for this process, {order}); its first rows: {first}"

    # -------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        start, self.start = self.start, None
        epoch = self.epoch
        # A copy: loading a position into a datasets.IterableDataset sticks to it for the whole epoch.
        stream = copy.deepcopy(self.stream)
        stream.set_epoch(epoch)
        block_no, skip, block_start = 0, 0, None
        if start is not None and start["epoch"] == epoch:
            block_no, skip, block_start = start["block"], start["taken"], start["block_start"]
            if block_start is not None:
                stream.load_state_dict(block_start)
        rows = iter(stream)
        while True:
            block, exhausted = self._read_block(rows, epoch, worker_id, block_no)
            if self.buffer_size > 1:
                random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker_id}-{block_no}").shuffle(block)
            for j in range(skip, len(block)):
                self.position = dict(epoch=epoch, block=block_no, block_start=block_start, taken=j + 1)
                yield block[j]()
            if exhausted:
                return
            block_start = stream.state_dict()  # after the block's last row: the next block's start
            block_no, skip = block_no + 1, 0

    def _read_block(
        self, rows: Iterator[dict[str, Any]], epoch: int, worker_id: int, block_no: int
    ) -> tuple[list[Callable[[], Any]], bool]:
        """The next rows' examples, unmade (images are decoded only for the examples taken), until the
        block holds ``buffer_size`` of them; and whether the stream ended."""
        block: list[Callable[[], Any]] = []
        template, noun = self.template, self.template.TEXT_NOUN
        n_rows = 0
        while len(block) < self.buffer_size:
            row = next(rows, None)
            if row is None:
                return block, True
            key = (self.rank, worker_id, epoch, block_no, n_rows)
            n_rows += 1
            texts = [t.strip() for t in texts_of(row.get(self.text_column)) if t.strip()]
            where = f"streamed row {key[-1]} of block {block_no} (process {self.rank}, worker {worker_id})"
            if not texts:
                block.append(lambda where=where: template.bad(f"missing_{noun}", f"{where}: no {noun}"))
                continue
            if self.image_id_column is not None and self.image_id_column in row:
                image_id = stable_id("image", *self.ids, row[self.image_id_column])
            else:
                image_id = stable_id("row", *self.ids, *key)
            for text in texts:
                flip = template.flips(f"stream-{self.rank}-{worker_id}-{block_no}-{len(block)}", epoch)
                source = Source(row, text, where, image_id, flip)
                block.append(lambda source=source: template.example(source))
        return block, False


def split_stream(stream: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """This process's part of ``stream``: whole shards when their count divides by ``world_size``, else
    every ``world_size``-th row (each process then reads every row and keeps its own)."""
    if world_size == 1:
        return stream
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


def stream_loader(
    dataset: StreamedExamples, batch_size: int, collate: Callable, num_workers: int
) -> StatefulDataLoader:
    """The training loader of a stream: ``state_dict`` / ``load_state_dict`` save and restore its
    position, each worker's included. The last, partial batch of each pass is dropped, as in map-style
    training."""
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(dataset.seed),
    )
