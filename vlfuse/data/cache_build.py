"""Computing a frozen tower's cache entries: one tower run per distinct input (an image's pixels as the
tower sees them, or a text's token ids), with each example mapped to its entry (``image_row`` /
``text_row``). ``vlfuse.data.feature_cache`` keys, stores and serves them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlfuse.data.examples import BadExample, ImageTextDataset, KnownImage
from vlfuse.data.loading import DataError, load_image

# Example fields that are not labels: the image (replaced by its cached features) and the text.
_INPUT_FIELDS = ("pixel_values", "text", "features")

FEATURES = {
    "image": ("image_tokens", "image_pooled", "image_prefix"),
    "text": ("text_tokens", "text_mask", "text_pooled", "text_prefix"),
}


def label_fields(dataset: ImageTextDataset) -> dict[str, torch.Tensor]:
    """The label fields of the dataset's examples (name -> a placeholder tensor of their shape and type).

    Raises:
        ValueError: if a label is not a tensor (such a dataset cannot be cached).
    """
    placeholder = dataset.placeholder()
    labels = {f.name: getattr(placeholder, f.name) for f in dataclasses.fields(placeholder)}
    labels = {k: v for k, v in labels.items() if k not in _INPUT_FIELDS}
    for name, value in labels.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"the feature cache cannot store {type(placeholder).__name__}.{name} (not a tensor)"
            )
    return labels


def _batches(n: int, batch_size: int, desc: str):
    progress = tqdm(total=n, desc=desc, unit="ex", disable=None)  # silent where stderr is no terminal
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        yield idx
        progress.update(len(idx))
    progress.close()


def image_content_key(dataset: ImageTextDataset, i: int, pixel_values: torch.Tensor) -> Any:
    """What makes two examples' images one cache entry: the dataset's own image id when
    ``data.columns.image_id`` names one (no hashing), else a hash of the pixels as the tower sees them
    (after preprocessing)."""
    if "image_id" in dataset.cfg.columns:
        return ("id", dataset.image_ids[i])
    pixels = pixel_values.detach().cpu().contiguous()
    return hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).digest()


def encoded_image_key(dataset: ImageTextDataset, i: int, cell: Any) -> Any:
    """What identifies example ``i``'s image before it is decoded: the dataset's own image id
    (``data.columns.image_id``), else a hash of the encoded bytes, else the image file's path; None when
    the cell holds none of these (it is decoded every time). Equal keys mean equal pixels."""
    if "image_id" in dataset.cfg.columns:
        return ("id", dataset.image_ids[i])
    if isinstance(cell, dict):
        if cell.get("bytes"):
            cell = cell["bytes"]
        else:
            cell = cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return hashlib.blake2b(cell, digest_size=16).digest()
    if isinstance(cell, str) and cell:
        return ("path", str(Path(dataset.cfg.image_root or "").expanduser() / Path(cell).expanduser()))
    return None


class ImageReader:
    """Reads a split's examples for the image tower's cache, decoding each distinct encoded image once.

    An image met before (the same bytes, file or ``data.columns.image_id``) is neither decoded nor
    preprocessed again: its example is made from its size alone (``KnownImage``: the labels, no pixels)
    and points at the entry already computed. A new one is decoded, preprocessed and keyed by its pixels
    (``image_content_key``), so that different files with equal pixels still share an entry.
    """

    def __init__(self, dataset: ImageTextDataset) -> None:
        self.dataset = dataset
        self.raw = dataset.undecoded()
        self.column = dataset.columns["image"]
        self.known: dict[Any, tuple[int, tuple[int, int]]] = {}  # encoded key -> (entry, image size)
        self.entries: dict[Any, int] = {}  # content key -> entry

    def read(self, i: int) -> tuple[Any, int | None, bool]:
        """Example ``i``, its entry (None for a bad example) and whether the entry is new."""
        row = self.dataset.read_row(i, self.raw)
        if isinstance(row, BadExample):
            return row, None, False
        key = encoded_image_key(self.dataset, i, row[self.column])
        if key is not None and key in self.known:
            entry, size = self.known[key]
            row[self.column] = KnownImage(size)
            return self.dataset.example_from(i, row), entry, False
        try:
            row[self.column] = image = load_image(row[self.column], self.dataset.cfg.image_root)
        except DataError:
            image = None  # the example says what is wrong (or stops on a configuration error)
        ex = self.dataset.example_from(i, row)
        if isinstance(ex, BadExample) or image is None:
            return ex, None, False
        content = image_content_key(self.dataset, i, ex.pixel_values)
        new = content not in self.entries
        entry = self.entries.setdefault(content, len(self.entries))
        if key is not None:
            self.known[key] = (entry, image.size)
        return ex, entry, new


def _open_features(folder: Path, name: str, rows: int, shape: tuple[int, ...], np_dtype, memmap: bool):
    if memmap:  # token features can be large: written to disk as they come
        return np.lib.format.open_memmap(folder / f"{name}.npy", "w+", np_dtype, (rows, *shape))
    return np.zeros((rows, *shape), np_dtype)


def _keep_entries(arrays: dict[str, np.ndarray], names: tuple[str, ...], count: int, folder: Path) -> None:
    """Cuts the entry arrays ``names`` (allocated for the most entries there could be) to the ``count``
    distinct entries found."""
    for name in names:
        array = arrays.get(name)
        if array is None or len(array) == count:
            continue
        if isinstance(array, np.memmap):
            array.flush()
            kept = np.lib.format.open_memmap(
                folder / f".{name}.npy", "w+", array.dtype, (count, *array.shape[1:])
            )
            kept[:] = array[:count]
            kept.flush()
            del array, kept
            os.replace(folder / f".{name}.npy", folder / f"{name}.npy")
            arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
        else:
            arrays[name] = array[:count]


def _run_image_tower(model, todo: list[tuple[int, Any]], arrays: dict, np_dtype, device) -> None:
    """Runs the image tower (or its frozen prefix, for an ``image_prefix`` cache) on ``todo``'s (entry,
    example) pairs and stores their features."""
    if not todo:
        return
    pixels = torch.stack([ex.pixel_values for _, ex in todo]).to(device)
    slots = [slot for slot, _ in todo]
    if "image_prefix" in arrays:
        prefix = model.image_encoder.prefix(pixels)
        arrays["image_prefix"][slots] = prefix.float().cpu().numpy().astype(np_dtype)
        return
    out = model.image_encoder(pixels, with_pooled=model.fusion.uses_image_pooled)
    if "image_tokens" in arrays:
        arrays["image_tokens"][slots] = out.tokens.float().cpu().numpy().astype(np_dtype)
    if "image_pooled" in arrays:
        arrays["image_pooled"][slots] = out.pooled.float().cpu().numpy().astype(np_dtype)


@torch.no_grad()
def compute_image(
    model, dataset: ImageTextDataset, folder: Path, dtype: str, batch_size: int, device, prefix: bool = False
):
    """Runs the frozen image tower once per distinct image (``image_content_key``), and stores the
    examples' labels beside it (a cached image needs no decoding at all). ``image_row`` maps each example
    to its entry. With ``prefix``, only the frozen prefix of a tower that trains its last blocks runs,
    and its output is stored (``image_prefix``)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    n, enc = len(dataset), model.image_encoder
    labels = label_fields(dataset)
    arrays: dict[str, np.ndarray] = {
        name: np.zeros((n, *value.shape), value.numpy().dtype) for name, value in labels.items()
    }
    arrays["valid"] = np.zeros((n,), np.bool_)
    arrays["image_row"] = np.zeros((n,), np.int64)
    most = max(1, len({row for row, _ in dataset.index}))  # never more entries than image rows
    if prefix:
        shape = enc.split().prefix_shape
        arrays["image_prefix"] = _open_features(folder, "image_prefix", most, shape, np_dtype, memmap=True)
    if model.fusion.uses_tokens and not prefix:
        shape = (enc.num_tokens, enc.token_dim)
        arrays["image_tokens"] = _open_features(folder, "image_tokens", most, shape, np_dtype, memmap=True)
    if model.fusion.uses_image_pooled and not prefix:
        arrays["image_pooled"] = _open_features(
            folder, "image_pooled", most, (enc.pooled_dim,), np_dtype, False
        )
    reader = ImageReader(dataset)
    todo: list[tuple[int, Any]] = []  # (entry, example) of images not run yet: full tower batches
    what = "frozen prefix" if prefix else "frozen image features"
    for idx in _batches(n, batch_size, f"caching {what} ({folder.name[:24]})"):
        for i in idx:
            ex, entry, new = reader.read(i)
            if entry is None:
                continue
            for name in labels:
                arrays[name][i] = torch.as_tensor(getattr(ex, name)).numpy()
            arrays["valid"][i] = True
            arrays["image_row"][i] = entry
            if new:
                todo.append((entry, ex))
        if len(todo) >= batch_size or idx[-1] == n - 1:
            _run_image_tower(model, todo, arrays, np_dtype, device)
            todo = []
    count = len(reader.entries)
    _keep_entries(arrays, FEATURES["image"], max(1, count), folder)
    _save(arrays, folder)
    return {"entries": count, "examples": n}


def compute_image_prefix(model, dataset: ImageTextDataset, folder: Path, dtype: str, batch_size: int, device):
    """``compute_image`` of the frozen prefix (``image_prefix``)."""
    return compute_image(model, dataset, folder, dtype, batch_size, device, prefix=True)


@torch.no_grad()
def compute_text(
    model, dataset: ImageTextDataset, folder: Path, dtype: str, batch_size: int, device, prefix: bool = False
):
    """Runs the frozen text tower once per distinct text as the tower sees it (its token ids); no image is
    read. ``text_row`` maps each example to its entry. With ``prefix``, only the frozen layers before the
    learnable ones run, and the hidden states entering the first learnable layer are stored
    (``text_prefix``, padded to ``max_length``, with ``text_mask``)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    n, enc = len(dataset), model.text_encoder
    arrays: dict[str, np.ndarray] = {"text_row": np.zeros((n,), np.int64)}
    if prefix:
        shape = (enc.max_length, enc.dim)
        arrays["text_prefix"] = _open_features(folder, "text_prefix", max(1, n), shape, np_dtype, memmap=True)
        arrays["text_mask"] = np.zeros((max(1, n), enc.max_length), np.bool_)
    else:
        arrays["text_pooled"] = np.zeros((max(1, n), enc.dim), np_dtype)
    if model.fusion.uses_tokens and not prefix:
        shape = (enc.max_length, enc.dim)
        arrays["text_tokens"] = _open_features(folder, "text_tokens", max(1, n), shape, np_dtype, memmap=True)
        arrays["text_mask"] = np.zeros((max(1, n), enc.max_length), np.bool_)
    entries: dict[bytes, int] = {}
    for idx in _batches(n, batch_size, f"caching frozen text features ({folder.name[:24]})"):
        tokens = enc.tokenize([dataset.texts[i] for i in idx], padding="max_length")
        new = []  # rows of this batch whose token ids were not seen before
        for j, i in enumerate(idx):
            key = tokens["input_ids"][j].numpy().tobytes()
            if key not in entries:
                entries[key] = len(entries)
                new.append(j)
            arrays["text_row"][i] = entries[key]
        if not new:
            continue
        slots = [int(arrays["text_row"][idx[j]]) for j in new]
        ids, mask = tokens["input_ids"][new].to(device), tokens["attention_mask"][new].to(device)
        if prefix:
            arrays["text_prefix"][slots] = enc.prefix(ids, mask).float().cpu().numpy().astype(np_dtype)
            arrays["text_mask"][slots] = mask.bool().cpu().numpy()
            continue
        out = enc(ids, mask)
        arrays["text_pooled"][slots] = out.pooled.float().cpu().numpy().astype(np_dtype)
        if "text_tokens" in arrays:
            arrays["text_tokens"][slots] = out.tokens.float().cpu().numpy().astype(np_dtype)
            arrays["text_mask"][slots] = out.mask.cpu().numpy()
    _keep_entries(arrays, FEATURES["text"], max(1, len(entries)), folder)
    _save(arrays, folder)
    return {"entries": len(entries), "examples": n}


def compute_text_prefix(model, dataset: ImageTextDataset, folder: Path, dtype: str, batch_size: int, device):
    """``compute_text`` of the frozen prefix (``text_prefix``)."""
    return compute_text(model, dataset, folder, dtype, batch_size, device, prefix=True)


def _save(arrays: dict[str, np.ndarray], folder: Path) -> None:
    for name, array in arrays.items():
        if isinstance(array, np.memmap):
            array.flush()
        else:
            np.save(folder / f"{name}.npy", array)
