"""Checking a feature-cache folder before it is read: a folder is someone's files like any other (copied,
edited, left by another version, its image files changed behind their paths), so its key, files, shapes,
dtypes and indices are verified against what this run would write (``cache_problem``), and the image files
a split names by path enter the key by size and modification time (``image_files_key``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vlfuse.data.cache_build import label_fields
from vlfuse.data.examples import ImageTextDataset

META_FILE = "cache.json"


def image_files_key(dataset: ImageTextDataset) -> str | None:
    """A digest of the image files the split names by path (cells with no embedded bytes): each file's
    path, size and modification time (``st_mtime_ns``), or ``missing``. None when no cell names a file.

    Size and modification time, not the bytes: hashing every image file at each start would cost as much
    as decoding them. A file replaced by one of the same size within the file system's time resolution
    (or with its time set back) goes unnoticed. The column is read from the Arrow table behind the split
    (``Dataset.data``: every row of its files, a slice's included, which can only add files to watch):
    the paths and the validity of the bytes only, no image bytes copied.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.columns["image"]
    root = Path(dataset.cfg.image_root or "").expanduser()
    digest, count = hashlib.sha256(), 0
    for cells in dataset.ds.data.column(column).chunks:
        if pa.types.is_struct(cells.type):
            embedded = pc.is_valid(pc.struct_field(cells, "bytes"))
            paths = pc.if_else(embedded, pa.scalar(None, pa.string()), pc.struct_field(cells, "path"))
        elif pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type):
            paths = cells
        else:
            continue
        for path in paths.to_pylist():
            if not path:
                continue
            try:
                stat = (root / Path(path).expanduser()).stat()
                stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            digest.update(f"{path}\0{stamp}\n".encode())
            count += 1
    return digest.hexdigest() if count else None


def expected_arrays(model, dataset: ImageTextDataset, tower: str, dtype: str) -> dict[str, tuple]:
    """The arrays a tower's cache folder holds: name -> (rows: ``examples`` or ``entries``, the shape of
    one row, the numpy dtype kind). What ``compute_image`` / ``compute_text`` write, and nothing else."""
    feature = "f"  # float16 or float32, as the key's dtype says (checked by the itemsize below)
    if tower in ("image", "image_prefix"):
        enc = model.image_encoder
        arrays = {
            name: ("examples", tuple(value.shape), value.numpy().dtype.kind)
            for name, value in label_fields(dataset).items()
        }
        arrays["valid"] = ("examples", (), "b")
        arrays["image_row"] = ("examples", (), "i")
        if tower == "image_prefix":  # the output of the frozen blocks before the learnable ones
            arrays["image_prefix"] = ("entries", tuple(enc.split().prefix_shape), feature)
            return arrays
        if model.fusion.uses_tokens:
            arrays["image_tokens"] = ("entries", (enc.num_tokens, enc.token_dim), feature)
        if model.fusion.uses_image_pooled:
            arrays["image_pooled"] = ("entries", (enc.pooled_dim,), feature)
        return arrays
    enc = model.text_encoder
    if tower == "text_prefix":  # the hidden states entering the first learnable layer, and their mask
        return {
            "text_row": ("examples", (), "i"),
            "text_prefix": ("entries", (enc.max_length, enc.dim), feature),
            "text_mask": ("entries", (enc.max_length,), "b"),
        }
    arrays = {"text_row": ("examples", (), "i"), "text_pooled": ("entries", (enc.dim,), feature)}
    if model.fusion.uses_tokens:
        arrays["text_tokens"] = ("entries", (enc.max_length, enc.dim), feature)
        arrays["text_mask"] = ("entries", (enc.max_length,), "b")
    return arrays


def _key_differences(stored: Any, key: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(key, dict):
        return [
            d
            for k in sorted(set(stored) | set(key), key=str)
            for d in _key_differences(stored.get(k), key.get(k), f"{prefix}{k}.")
        ]
    return [] if stored == key else [prefix.rstrip(".")]


def cache_problem(folder: Path, key: dict[str, Any], arrays: dict[str, tuple], examples: int) -> str | None:
    """Why the cache folder cannot serve ``key`` (None when it can): ``cache.json`` unreadable or its key
    differing (the fields named), a file missing or one not written for this tower, an array whose rows,
    row shape or dtype differ from the dataset's and the tower's (``expected_arrays``), or an index outside
    the stored entries. A folder is someone's files like any other: it is verified before it is read."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        stats = meta.pop("stats")
        entries = int(stats["entries"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its {META_FILE} is unreadable ({type(err).__name__}: {err})"
    if differences := _key_differences(meta, key):
        return f"its key differs in {', '.join(differences[:5])}"
    files = {p.name for p in folder.iterdir()} - {META_FILE}
    wanted = {f"{name}.npy" for name in arrays}
    if files != wanted:
        extra, missing = sorted(files - wanted), sorted(wanted - files)
        return f"its files are not this tower's (unexpected: {extra}; missing: {missing})"
    itemsize = 2 if key["dtype"] == "float16" else 4
    for name, (rows, shape, kind) in arrays.items():
        try:
            array = np.load(folder / f"{name}.npy", mmap_mode="r")  # allow_pickle=False: never an object
        except (OSError, ValueError) as err:
            return f"{name}.npy is unreadable ({err})"
        count = examples if rows == "examples" else max(1, entries)
        if array.shape != (count, *shape) or array.dtype.kind != kind:
            return f"{name}.npy holds {array.dtype}{list(array.shape)}, not {kind}{[count, *shape]}"
        if kind == "f" and array.dtype.itemsize != itemsize:
            return f"{name}.npy is {array.dtype}, not the key's {key['dtype']}"
        if name.endswith("_row") and array.size:
            valid = np.load(folder / "valid.npy") if name == "image_row" else np.ones(len(array), bool)
            used = np.asarray(array)[valid]
            if used.size and (used.min() < 0 or used.max() >= max(1, entries)):
                return f"{name}.npy has indices outside [0, {max(1, entries)})"
    return None
