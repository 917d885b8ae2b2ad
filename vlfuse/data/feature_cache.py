"""Frozen-encoder feature cache: a frozen tower's outputs are computed once per split and read back.

A frozen tower maps the same input to the same features every epoch, so ``train.cache_features=true``
runs it once over a split, writes its token features (and pooled vector and mask) to disk, and training
and evaluation read them instead of running the tower.

Storage is one folder per (split, tower, key) under ``train.cache_dir``, with ``.npy`` arrays opened as
memory maps: random access by example index with no decoding and no copy, which is what a shuffled
training loop needs (an Arrow table would decode a row group per access; safetensors has no partial
reads). Each tower has its own folder and key, so a run that freezes only the text tower reuses the text
features of a run that froze both (``recipes/compare.py`` computes each tower's features once for all its
modes). The key covers everything that changes the tower's features: its name, a hash of its weights,
the preprocessing (image size, normalisation, interpolation; the tokenizer's vocabulary and
``max_length``), which features the fusion reads (token features or only pooled vectors), the dataset's
fingerprint, split, columns and the settings its labels are read with (e.g. box formats), and the storage
dtype. The image tower's folder also holds the examples' labels, so a cached image is never decoded.
A folder is written under a temporary name and published by rename, so a crash never leaves a half cache.
Clearing the cache is deleting folders: each holds a ``cache.json`` saying what it was computed from.

The cache knows no task: it serves any ``ImageTextDataset`` whose examples are dataclasses with
``pixel_values``, ``text``, ``features`` and tensor labels (a task says whether its datasets qualify with
``Task.feature_cache``). The labels are stored beside the features, so a cached example needs no image
decoding at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlfuse.data.cache_build import (
    FEATURES,
    compute_image,
    compute_image_prefix,
    compute_text,
    compute_text_prefix,
    label_fields,
)
from vlfuse.data.cache_check import META_FILE, cache_problem, expected_arrays, image_files_key
from vlfuse.data.examples import BadExample, ImageTextDataset
from vlfuse.schema import trains_top_only

CACHE_FORMAT_VERSION = 3  # 3: one entry per distinct input (image_row / text_row map examples to it)


def default_cache_dir() -> Path:
    """``$VLFUSE_CACHE`` or ``~/.cache/vlfuse``, plus ``features``."""
    root = os.environ.get("VLFUSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "vlfuse"
    return Path(root).expanduser() / "features"


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state (weights and buffers)."""
    return state_fingerprint(module.state_dict())


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of named tensors (in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def dataset_key(dataset: ImageTextDataset, split: str, dtype: str) -> dict[str, Any]:
    """What identifies the examples of a split: the dataset, its fingerprint, the split, the row and
    example counts, the example type and the settings its labels are read with; and the storage dtype."""
    return {
        "version": CACHE_FORMAT_VERSION,
        "dataset": dataset.cfg.dataset,
        "dataset_fingerprint": getattr(dataset.ds, "_fingerprint", None),
        "split": split,
        "rows": len(dataset.ds),
        "examples": len(dataset),
        "example_type": type(dataset.placeholder()).__name__,
        **dataset.cache_settings(),
        "dtype": dtype,
    }


def tower_key(model, dataset: ImageTextDataset, split: str, dtype: str, tower: str) -> dict[str, Any]:
    """Everything that changes one frozen tower's cached features (and the examples they belong to).

    The key names nothing about the other tower or what trains, so every run that freezes this tower
    (e.g. each of ``recipes/compare.py``'s modes) reads the same folder. The image tower's key holds the
    state of the image files the split names by path (``image_files_key``); that part is left out of the
    folder's name, so a changed file rebuilds the folder in place, saying why.
    """
    key = {**dataset_key(dataset, split, dtype), "tower": tower, "tokens": bool(model.fusion.uses_tokens)}
    if tower in ("image", "image_prefix"):
        enc = model.image_encoder
        key["image_files"] = image_files_key(dataset)
        if tower == "image_prefix":
            weights = _prefix_key(enc, key)
            key["prefix"]["shape"] = list(enc.split().prefix_shape)
        else:
            weights = module_fingerprint(enc)
        key["encoder"] = {
            "name": enc.cfg.name,
            "weights": weights,
            # timm kwargs can change what the same weights compute (e.g. output_stride).
            "kwargs": _plain(enc.cfg.kwargs),
            "image_size": dataset.image_size,
            "mean": list(dataset.mean),
            "std": list(dataset.std),
            "interpolation": dataset.interpolation,
            "pooled": None if tower == "image_prefix" else bool(model.fusion.uses_image_pooled),
        }
    else:
        enc = model.text_encoder
        vocab = json.dumps(enc.tokenizer.get_vocab(), sort_keys=True).encode()
        weights = _prefix_key(enc, key) if tower == "text_prefix" else module_fingerprint(enc)
        key["encoder"] = {
            "name": enc.cfg.name,
            "weights": weights,
            # config overrides can change what the same weights compute (e.g. hidden_act).
            "config_overrides": _plain(enc.cfg.config_overrides),
            "tokenizer": type(enc.tokenizer).__name__,
            "vocab": hashlib.sha256(vocab).hexdigest(),
            "max_length": enc.max_length,
        }
    return key


def _prefix_key(enc, key: dict[str, Any]) -> str:
    """The fingerprint of a cut tower's frozen prefix weights only (the learnable blocks may differ from
    trial to trial); adds the cut to ``key``. The fusion's reading does not change the prefix."""
    split = enc.split()
    state = enc.model.state_dict()
    key["prefix"] = {"boundary": split.boundary}
    key["tokens"] = None
    return state_fingerprint({n: state[n] for n in split.prefix_state})


def _plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping as plain JSON values (sorted keys; anything else as its repr)."""
    return json.loads(json.dumps(dict(mapping), sort_keys=True, default=repr))


# Key parts left out of a folder's name (checked against the folder's cache.json instead).
VOLATILE_KEYS = ("image_files",)


def _digest(key: dict[str, Any]) -> str:
    named = {k: v for k, v in key.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:20]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


_COMPUTE = {
    "image": compute_image,
    "image_prefix": compute_image_prefix,
    "text": compute_text,
    "text_prefix": compute_text_prefix,
}


@dataclass
class CachedDataset(Dataset):
    """The examples of a dataset with its frozen towers' features read from their cache folders (one per
    tower); with the image tower cached, the labels come from the cache too and no image is decoded."""

    base: ImageTextDataset
    folders: dict[str, Path]  # tower -> its cache folder
    names: dict[str, list[str]]  # tower -> the arrays it reads from its own folder (``expected_arrays``)

    def __post_init__(self) -> None:
        self.arrays = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r")
            for tower, folder in self.folders.items()
            for name in self.names[tower]
        }
        self.counts = self.base.counts
        self.labels = list(label_fields(self.base))
        self.cache_stats = {tower: cache_stats(folder) for tower, folder in self.folders.items()}
        self.example_type = type(self.base.placeholder())

    @property
    def texts(self) -> list[str]:
        return self.base.texts

    @property
    def image_ids(self) -> list[int]:
        return self.base.image_ids

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def describe(self) -> str:
        where = ", ".join(f"{tower} from {folder}" for tower, folder in self.folders.items())
        return self.base.describe() + f"; frozen features: {where}"

    def blank_features(self) -> dict[str, torch.Tensor]:
        """Zero features of one example (a bad row's placeholder), one real token in the text mask."""
        blank = {
            k: torch.zeros(a.shape[1:], dtype=torch.bool if k == "text_mask" else torch.float32)
            for k, a in self.arrays.items()
            if k in FEATURES["image"] + FEATURES["text"]
        }
        if "text_mask" in blank:
            blank["text_mask"][0] = True
        return blank

    def text_features(self, i: int) -> dict[str, torch.Tensor]:
        """The cached text features of example ``i`` (empty when the text tower is not cached)."""
        if "text_row" not in self.arrays:
            return {}
        entry = int(self.arrays["text_row"][i])
        return {
            k: torch.from_numpy(
                np.array(self.arrays[k][entry], dtype=np.bool_ if k == "text_mask" else np.float32)
            )
            for k in FEATURES["text"]
            if k in self.arrays
        }

    def _image_features(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.arrays["image_row"][i])
        return {
            k: torch.from_numpy(np.array(self.arrays[k][row], dtype=np.float32))
            for k in FEATURES["image"]
            if k in self.arrays
        }

    def _bad(self, i: int, bad: Any) -> BadExample:
        """Example ``i`` as a bad row, its placeholder given blank features (batches stack alike)."""
        if not isinstance(bad, BadExample):
            bad = self.base[i]  # re-read the row to tell why (bad rows are few)
            bad = bad if isinstance(bad, BadExample) else self.base.bad("bad_row", f"example {i}")
        bad.placeholder.features = self.blank_features()
        if "image" in self.folders:
            bad.placeholder.pixel_values = None
        return bad

    def __getitem__(self, i: int) -> Any:
        if "image" in self.folders:
            if not self.arrays["valid"][i]:
                return self._bad(i, None)
            features = self._image_features(i)
            labels = {name: torch.from_numpy(np.array(self.arrays[name][i])) for name in self.labels}
            pixel_values = None
        else:
            live = self.base[i]
            if isinstance(live, BadExample):
                return self._bad(i, live)
            features, pixel_values = {}, live.pixel_values
            labels = {name: getattr(live, name) for name in self.labels}
        features.update(self.text_features(i))
        return self.example_type(
            pixel_values=pixel_values, text=self.base.texts[i], features=features, **labels
        )


def cached_dataset(
    model,
    dataset: ImageTextDataset,
    split: str,
    cache_dir: str | Path | None,
    dtype: str,
    batch_size: int,
    accelerator,
) -> CachedDataset:
    """The cached version of ``dataset``: each frozen tower's features from the folder with its key,
    computed first if there is none (on the main process; the others wait and then read it)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folders, names = {}, {}
    for tower in ("image", "text"):
        kind = tower
        if model.tower_is_trainable(tower):
            if not prefix_cacheable(model, accelerator, tower):
                continue
            kind = f"{tower}_prefix"  # the frozen blocks before the learnable ones
        key = tower_key(model, dataset, split, dtype, kind)
        arrays = expected_arrays(model, dataset, kind, dtype)
        folder = root / f"{split}-{kind}-{_digest(key)}"
        folders[tower], names[tower] = folder, list(arrays)
        prefix = kind.endswith("_prefix")
        what = f"{tower} tower's frozen prefix" if prefix else f"{tower} tower"
        with accelerator.main_process_first():
            problem = None
            if accelerator.is_main_process and (folder / META_FILE).is_file():
                problem = cache_problem(folder, key, arrays, len(dataset))
                if problem:
                    accelerator.print(f"feature cache rebuilt ({what}): {folder}: {problem}")
            if accelerator.is_main_process and (problem or not (folder / META_FILE).is_file()):
                _build(model, dataset, tower, kind, key, folder, dtype, batch_size, accelerator)
                verb = "written"
            else:
                verb = "reused"
        stats = cache_stats(folder)
        where = f", entering {key['prefix']['boundary']}" if prefix else ""
        beside = ""
        if prefix:
            whole = whole_tower_bytes(model, tower, stats["entries"], dtype)
            beside = f"; the whole tower's output would take {whole / 2**20:.1f} MiB"
        accelerator.print(
            f"feature cache {verb} ({what}{where}): {folder} ({stats['bytes'] / 2**20:.1f} MiB{beside}; "
            f"{stats['entries']:,} distinct inputs for {stats['examples']:,} examples; built in "
            f"{stats['build_time_s']:.1f} s)"
        )
    return CachedDataset(dataset, folders, names)


def _build(
    model, dataset, tower: str, kind: str, key: dict, folder: Path, dtype: str, batch_size: int, accelerator
):
    """Computes one cache folder under a temporary name and publishes it by rename."""
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder = getattr(model, f"{tower}_encoder")
    home = next(encoder.parameters()).device  # where training wants it (see VLFuseModel)
    encoder.to(accelerator.device)
    was_training = model.training
    model.train()  # what the frozen part computes in training (its frozen layers in eval mode)
    start = time.perf_counter()
    stats = _COMPUTE[kind](model, dataset, tmp, dtype, batch_size, accelerator.device)
    stats["build_time_s"] = round(time.perf_counter() - start, 3)
    stats["bytes"] = folder_size(tmp)
    model.train(was_training)
    encoder.to(home)
    # The key says what it was computed from; the stats what it holds and what it cost.
    (tmp / META_FILE).write_text(json.dumps({**key, "stats": stats}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def prefix_cacheable(model, accelerator, tower: str = "image") -> bool:
    """Whether a trainable tower's frozen prefix can be cached: it trains only its last blocks and can be
    cut there (``ImageEncoder.split``, ``TextEncoder.split``), and the run does not shard the model (FSDP
    and DeepSpeed run the whole tower's modules themselves). Says why not when the tower trains only its
    top."""
    from accelerate.utils import DistributedType

    enc = getattr(model, f"{tower}_encoder")
    if not trains_top_only(enc.cfg):
        return False
    split = enc.split()
    if isinstance(split, str):
        reason = split
    elif accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        reason = f"{accelerator.distributed_type.value} runs the sharded tower whole"
    else:
        return True
    accelerator.print(f"feature cache: the {tower} tower's frozen blocks are not cached ({reason}); it runs")
    return False


def whole_tower_bytes(model, tower: str, entries: int, dtype: str) -> int:
    """What a frozen tower's cached output (tokens and/or pooled vector, a text's mask) takes for
    ``entries``."""
    itemsize = 2 if dtype == "float16" else 4
    if tower == "text":
        enc = model.text_encoder
        tokens = enc.max_length * (enc.dim * itemsize + 1) if model.fusion.uses_tokens else 0
        return (tokens + enc.dim * itemsize) * entries
    enc = model.image_encoder
    per = (enc.num_tokens * enc.token_dim if model.fusion.uses_tokens else 0) + (
        enc.pooled_dim if model.fusion.uses_image_pooled else 0
    )
    return per * entries * itemsize


def cache_stats(folder: Path) -> dict[str, Any]:
    """What a cache folder holds and cost: distinct entries, examples, bytes, build time (``cache.json``)."""
    stats = json.loads((folder / META_FILE).read_text()).get("stats", {})
    return {"folder": folder.name, **stats}
