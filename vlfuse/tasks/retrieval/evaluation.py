"""Retrieval evaluation over distinct inputs: each distinct image and caption is embedded once, and every
row of the split is scored through its distinct entry.

Recall is tie-aware, and a tie is exact equality of scores (``metrics``). The same caption embedded in
two batches is padded to two lengths and its embeddings differ in the last bits, so duplicate captions
(common in COCO and Flickr30k) would be ordered by floating-point noise instead of counted as ties. Here
an input's key is what the tower sees: a caption's token ids (the unpadded ones), an image's pixels after
preprocessing, or a frozen tower's cached features; the first batch that holds a key embeds it, and every
row with that key reads that one embedding, on every process.

On several processes the keys of each step's batches are gathered (a few bytes a row), so every process
assigns the same entries: a key new to the split is embedded by the lowest-ranked process holding it,
once over all processes. The embeddings are gathered once at the end. Every process still runs the model
once per batch (DDP and FSDP need equal calls): one with nothing new runs one row of its batch and drops
the result.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from accelerate import Accelerator

from vlfuse.data.cache_build import FEATURES
from vlfuse.distributed import gather_rows

# The model's inputs of one image (first dim: the batch's images) and of one caption (first dim: its
# captions, image-major): the live tower's, or what the feature cache serves (a frozen tower's features,
# the frozen prefix's output of a tower that trains its last blocks).
IMAGE_INPUTS = ("pixel_values", *FEATURES["image"])
TEXT_INPUTS = ("input_ids", "attention_mask", *FEATURES["text"])


def content_keys(*tensors: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` int64: a 128-bit BLAKE2b digest of each row's bytes over ``tensors`` (one row each)."""
    if not tensors:
        raise ValueError("an evaluation batch holds none of the model's inputs to key its rows by")
    n = tensors[0].shape[0]
    flat = [t.detach().cpu().contiguous().reshape(n, -1).view(torch.uint8).numpy() for t in tensors]
    digests = b"".join(
        hashlib.blake2b(b"".join(f[i].tobytes() for f in flat), digest_size=16).digest() for i in range(n)
    )
    return torch.from_numpy(np.frombuffer(digests, dtype=np.int64).copy()).reshape(n, 2)


def token_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` keys of tokenized captions by their unpadded token ids (padding side and length do not
    change a key; a caption cut at ``max_length`` is the caption the tower sees)."""
    rows = [ids[mask.bool()] for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    if not rows:
        return torch.zeros((0, 2), dtype=torch.int64)
    return torch.cat([content_keys(r[None]) for r in rows])


def input_keys(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys of an evaluation batch's images ``[B, 2]`` and captions ``[B * C, 2]``."""
    images = content_keys(*(batch[k] for k in IMAGE_INPUTS if k in batch))
    if "input_ids" in batch:
        texts = token_keys(batch["input_ids"], batch["attention_mask"])
    else:
        texts = content_keys(*(batch[k] for k in TEXT_INPUTS if k in batch))
    return images, texts


class Entries:
    """The distinct inputs of one kind met so far (the same table on every process: key -> entry) and
    the embeddings this process computed, by entry."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, int], int] = {}
        self._entries: list[int] = []
        self._embeds: list[torch.Tensor] = []

    def assign(self, keys_by_rank: list[list[tuple[int, int]]], rank: int) -> tuple[list[int], list[int]]:
        """Entries for one step's keys of every process (in rank order). Returns this process's rows'
        entries and the rows it embeds: the first row of each key new to the split, on the lowest rank
        that holds it."""
        own = []
        for r, keys in enumerate(keys_by_rank):
            for j, key in enumerate(keys):
                if key not in self.index:
                    self.index[key] = len(self.index)
                    if r == rank:
                        own.append(j)
        return [self.index[key] for key in keys_by_rank[rank]], own

    def keep(self, entries: list[int], embeds: torch.Tensor) -> None:
        self._entries.extend(entries)
        self._embeds.append(embeds.detach().float())

    def table(self, device: torch.device, dim: int) -> torch.Tensor:
        """``[entries, dim]`` on the CPU: every process's embeddings, each entry from the process that
        computed it."""
        mine = torch.cat(self._embeds) if self._embeds else torch.zeros((0, dim), device=device)
        embeds, _ = gather_rows(mine.to(device))
        entries, _ = gather_rows(torch.tensor(self._entries, dtype=torch.int64, device=device))
        if sorted(entries.tolist()) != list(range(len(self.index))):
            raise RuntimeError(
                f"retrieval evaluation: {len(entries)} embeddings came back for {len(self.index)} "
                "distinct inputs (the processes disagree on the split's inputs)"
            )
        table = torch.zeros((len(self.index), dim))
        table[entries.cpu()] = embeds.float().cpu()
        return table


def _keys_by_rank(keys: torch.Tensor, world: int) -> list[list[tuple[int, int]]]:
    if world == 1:
        return [[tuple(k) for k in keys.tolist()]]
    everyone, sizes = gather_rows(keys)
    rows = [tuple(k) for k in everyone.tolist()]
    starts = np.cumsum([0, *sizes])
    return [rows[starts[r] : starts[r + 1]] for r in range(world)]


def _inputs(batch: dict[str, torch.Tensor], names: tuple[str, ...], rows: list[int]) -> dict:
    index = torch.tensor(rows, dtype=torch.long, device=batch["valid"].device)
    return {k: batch[k].index_select(0, index) for k in names if k in batch}


@torch.no_grad()
def distinct_eval_values(accelerator: Accelerator, model, loader) -> dict[str, torch.Tensor]:
    """The split's retrieval values (``RetrievalTask.example_values``' layout: ``image_embeds`` ``[I, D]``,
    ``text_embeds`` ``[I, C, D]``, ``text_valid``, ``valid``), gathered in the split's order, with every
    distinct image and caption embedded once over all processes and every row reading its entry's
    embedding (identical inputs get bitwise equal rows)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    images, texts = Entries(), Entries()
    per_example: dict[str, list[torch.Tensor]] = {}
    dims: dict[str, int] = {}
    for batch in loader:
        batch.pop("bad_rows", None)
        image_keys, text_keys = batch.pop("image_keys"), batch.pop("text_keys")
        image_entry, image_rows = images.assign(_keys_by_rank(image_keys, world), rank)
        text_entry, text_rows = texts.assign(_keys_by_rank(text_keys, world), rank)
        # A process with nothing new still runs both towers on one row: DDP and FSDP need every process
        # to make the same calls (FSDP gathers each tower's shards in its forward).
        run_images = image_rows or ([0] if world > 1 else [])
        run_texts = text_rows or ([0] if world > 1 else [])
        if run_images or run_texts:
            inputs = {}
            if run_images:
                inputs.update(_inputs(batch, IMAGE_INPUTS, run_images))
            if run_texts:
                inputs.update(_inputs(batch, TEXT_INPUTS, run_texts))
            out = model(**inputs)
            for name, entries, rows, kept in (
                ("image_embeds", image_entry, image_rows, images),
                ("text_embeds", text_entry, text_rows, texts),
            ):
                if name in out:
                    dims[name] = out[name].shape[-1]
                if rows:
                    kept.keep([entries[j] for j in rows], out[name][: len(rows)])
        b, c = batch["text_valid"].shape
        device = batch["valid"].device
        values = {
            "image_entry": torch.tensor(image_entry, dtype=torch.int64, device=device),
            "text_entry": torch.tensor(text_entry, dtype=torch.int64, device=device).reshape(b, c),
            "text_valid": batch["text_valid"],
            "valid": batch["valid"],
        }
        for k, v in accelerator.gather_for_metrics(values).items():
            per_example.setdefault(k, []).append(v.cpu())
    if not per_example:
        empty = torch.zeros((0,))
        return {"image_embeds": empty, "text_embeds": empty, "text_valid": empty, "valid": empty}
    gathered = {k: torch.cat(v) for k, v in per_example.items()}
    device = accelerator.device
    image_table = images.table(device, dims.get("image_embeds", 0))
    text_table = texts.table(device, dims.get("text_embeds", 0))
    return {
        "image_embeds": image_table[gathered["image_entry"]],
        "text_embeds": text_table[gathered["text_entry"]],
        "text_valid": gathered["text_valid"],
        "valid": gathered["valid"],
    }
