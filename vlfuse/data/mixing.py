"""Several datasets in one run (``data.datasets``), mixed by weight.

Each source is read by the task's own dataset with its own columns, box format and image root, so rows
of different layouts (an embedded image and an image path, xywh and xyxy boxes) become examples of one
kind first; then they are mixed. That is why the mix is not ``datasets.interleave_datasets``: it needs
every source to have the same columns and features before mixing, and it draws its order from a
generator of its own, which neither the epoch-seeded sampler (map-style) nor the saved stream position
(streaming) would replay on resume.

Map-style (``MixedDataset``): an epoch holds ``count_k`` examples of source ``k``, fixed by the weights
and the sizes (``mix_counts``): with ``first_exhausted`` the epoch ends when the first source with weight
> 0 is used up, so no example repeats; with ``all_exhausted`` when every one has been read whole, so the
smaller ones repeat. Which examples of a larger source an epoch takes is drawn per (seed, epoch, source);
the loader's epoch-seeded shuffle then mixes the sources, so resuming and splitting between processes
work as for one dataset. A source with weight 0 is never read.

Streamed (``MixedStream``): each example's source is drawn by weight from a generator keyed by (seed,
epoch, process, worker); the position (draws and every source's own stream position) is saved with the
checkpoint like a single stream's.

Examples keep which source they came from: image ids are made distinct across sources (two sources'
image 0 are different images, never each other's positives), and bad rows are counted per source.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlfuse.data.examples import BadExample

FIRST_EXHAUSTED, ALL_EXHAUSTED = "first_exhausted", "all_exhausted"


def mix_counts(sizes: Sequence[int], weights: Sequence[float], stopping: str) -> list[int]:
    """Examples of each source in one mixed epoch: proportional to ``weights``, until the first source
    with weight > 0 is used up (``first_exhausted``) or until every one has been read whole
    (``all_exhausted``)."""
    total = sum(weights)
    shares = [w / total for w in weights]
    spans = [n / p for n, p in zip(sizes, shares) if p > 0]  # epoch length at which each runs out
    length = min(spans) if stopping == FIRST_EXHAUSTED else max(spans)
    counts = []
    for n, p in zip(sizes, shares):
        c = round(p * length) if p > 0 else 0
        counts.append(min(c, n) if stopping == FIRST_EXHAUSTED else max(c, n if p > 0 else 0))
    return counts


def tagged(example: Any, source: int, name: str, id_offset: int) -> Any:
    """``example`` marked with its source: a bad one names the source in its detail; an image id is
    moved past the previous sources' ids."""
    if isinstance(example, BadExample):
        return dataclasses.replace(example, detail=f"{name}: {example.detail}", source=source)
    image_id = getattr(example, "image_id", None)
    if id_offset and torch.is_tensor(image_id) and image_id.item() >= 0:
        return dataclasses.replace(example, image_id=image_id + id_offset)
    return example


def locate(ends: Sequence[int], j: int) -> tuple[int, int]:
    """(part, position in it) of item ``j`` of parts laid end to end (``ends``: cumulative lengths)."""
    k = bisect.bisect_right(ends, j)
    return k, j - (ends[k - 1] if k else 0)


def summed_counts(parts: Sequence[Any]) -> Counter[str]:
    """The parts' counters (rows, examples, dropped texts, ...) added up."""
    return sum((Counter(getattr(d, "counts", {})) for d in parts), Counter())


ID_STRIDE = 1 << 40  # source k's image ids start at k * ID_STRIDE: no split has 2**40 images


def id_offsets(n_sources: int) -> list[int]:
    """Where each source's image ids start, so that no two sources share one."""
    return [k * ID_STRIDE for k in range(n_sources)]


class MixedDataset(Dataset):
    """Map-style sources mixed by weight (see the module's description).

    Args:
        parts: (name, the task's dataset of that source's split) per source.
        weights: each source's share of the examples (0: never read).
        stopping: ``first_exhausted`` or ``all_exhausted``.
        seed: ``train.seed`` (which examples of a larger source an epoch takes).
    """

    def __init__(self, parts: list[tuple[str, Any]], weights: Sequence[float], stopping: str, seed: int):
        self.names = [name for name, _ in parts]
        self.parts = [dataset for _, dataset in parts]
        self.weights = list(weights)
        self.sizes = [len(d) for d in self.parts]
        if empty := [n for n, size, w in zip(self.names, self.sizes, self.weights) if w > 0 and size == 0]:
            raise ValueError(f"data.datasets: source {empty[0]!r} has no training examples")
        self.taken = mix_counts(self.sizes, self.weights, stopping)  # examples per source and epoch
        self.ends = np.cumsum(self.taken).tolist()
        self.counts = summed_counts(self.parts)
        self.id_offsets = id_offsets(len(self.parts))
        self.seed, self.epoch, self.stopping = seed, 0, stopping
        self._orders: dict[tuple[int, int, int], list[int]] = {}

    def __len__(self) -> int:
        return self.ends[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._orders = epoch, {}
        for part in self.parts:
            part.set_epoch(epoch)

    def source_of(self, j: int) -> tuple[int, int]:
        """(source, index in that source's dataset) of mixed example ``j`` in this epoch."""
        k, local = locate(self.ends, j)
        cycle, at = divmod(local, self.sizes[k])
        key = (self.epoch, k, cycle)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, self.epoch, k, cycle])
            self._orders[key] = rng.permutation(self.sizes[k]).tolist()
        return k, self._orders[key][at]

    def __getitem__(self, j: int) -> Any:
        k, i = self.source_of(j)
        return tagged(self.parts[k][i], k, self.names[k], self.id_offsets[k])

    def describe(self) -> str:
        total = len(self)
        shares = ", ".join(
            f"{name} {count:,} ({count / total:.1%}, weight {w:g}) of {size:,}"
            for name, count, size, w in zip(self.names, self.taken, self.sizes, self.weights)
        )
        lines = [f"{name}: {part.describe()}" for name, part in zip(self.names, self.parts)]
        return f"{total:,} mixed examples per epoch ({self.stopping}): {shares}\n  " + "\n  ".join(lines)


class MixedStream(IterableDataset):
    """Streamed sources (``StreamedExamples``) mixed by weight, one draw per example (see the module's
    description); its position is the draws made and every source's own position."""

    def __init__(
        self, parts: list[tuple[str, Any]], weights: Sequence[float], stopping: str, rank: int, seed: int
    ):
        self.names = [name for name, _ in parts]
        self.parts = [stream for _, stream in parts]
        self.weights, self.stopping = list(weights), stopping
        self.rank, self.seed, self.epoch = rank, seed, 0
        self.position: dict[str, Any] = {"epoch": 0, "draws": 0, "ended": [], "parts": None}
        self.start: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in self.parts:
            part.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**copy.deepcopy(self.position), "parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = copy.deepcopy(state)
        self.position = copy.deepcopy(state)
        self.epoch = state["epoch"]
        for part, saved in zip(self.parts, state["parts"]):
            part.load_state_dict(saved)

    def describe(self) -> str:
        mix = ", ".join(f"{n} (weight {w:g})" for n, w in zip(self.names, self.weights))
        return f"streamed sources mixed by weight ({self.stopping}): {mix}"

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        start, self.start = self.start, None
        epoch = self.epoch
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker_id}-mix")
        draws, ended = 0, set()
        if start is not None and start["epoch"] == epoch:
            draws, ended = start["draws"], set(start["ended"])
            for _ in range(draws):  # the generator where the saved run left it
                rng.random()
        iterators = [iter(part) for part in self.parts]
        live = [k for k, w in enumerate(self.weights) if w > 0]
        cumulative = np.cumsum([self.weights[k] for k in live]).tolist()
        while True:
            k = live[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]
            draws += 1
            example = next(iterators[k], None)
            if example is None:  # this source's pass ended
                ended.add(k)
                if self.stopping == FIRST_EXHAUSTED or ended.issuperset(live):
                    return
                iterators[k] = iter(self.parts[k])  # all_exhausted: it starts again
                example = next(iterators[k], None)
                if example is None:
                    return
            self.position = {"epoch": epoch, "draws": draws, "ended": sorted(ended), "parts": None}
            yield tagged(example, k, self.names[k], 0)  # streamed image ids already name their source


class MixedCollator:
    """The task's collator, plus ``bad_rows_by_source`` (``[sources]``): the batch's bad rows counted by
    the source they came from."""

    def __init__(self, collate, sources: int) -> None:
        self.collate, self.sources = collate, sources

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        by_source = torch.zeros(self.sources, dtype=torch.long)
        for e in examples:
            if isinstance(e, BadExample):
                by_source[e.source] += 1
        return {**self.collate(examples), "bad_rows_by_source": by_source}


class ConcatExamples(Dataset):
    """The evaluation examples of every source, one source after the other (the overall metrics), with
    what the datasets built over examples read (texts, image ids made distinct across sources, cached
    text features), so a task can group them as it groups one source's (``Task.over_examples``).

    Args:
        parts: (name, the task's examples of that source's split) per source.
    """

    def __init__(self, parts: list[tuple[str, Any]]) -> None:
        self.names = [name for name, _ in parts]
        self.parts = [dataset for _, dataset in parts]
        self.ends = np.cumsum([len(d) for d in self.parts]).tolist()
        self.id_offsets = id_offsets(len(self.parts))
        self.texts = [t for d in self.parts for t in getattr(d, "texts", [])]
        self.image_ids = [
            i + offset for d, offset in zip(self.parts, self.id_offsets) for i in getattr(d, "image_ids", [])
        ]
        self.image_size = getattr(self.parts[0], "image_size", None)
        self.counts = summed_counts(self.parts)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, j: int) -> Any:
        k, i = locate(self.ends, j)
        return tagged(self.parts[k][i], k, self.names[k], self.id_offsets[k])

    def text_features(self, j: int) -> dict[str, torch.Tensor]:
        k, i = locate(self.ends, j)
        return self.parts[k].text_features(i)

    def blank_features(self) -> dict[str, torch.Tensor]:
        return self.parts[0].blank_features()

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def describe(self) -> str:
        return f"all {len(self.parts)} sources together: {len(self):,} examples"
