"""Frozen-encoder feature cache: a frozen tower's outputs are computed once per split and read back.

A frozen tower maps the same input to the same features every epoch, so ``train.cache_features=true``
runs it once over a split, writes its token features (and pooled vector and mask) to disk, and training
and evaluation read them instead of running the tower.

Storage is one folder per (split, key) under ``train.cache_dir``, with ``.npy`` arrays opened as memory
maps: random access by example index with no decoding and no copy, which is what a shuffled training
loop needs (an Arrow table would decode a row group per access; safetensors has no partial reads).
The key covers everything that changes the features: each cached tower's name, a hash of its weights,
the preprocessing (image size, normalisation, interpolation; the tokenizer's vocabulary and
``max_length``), the dataset's fingerprint, split, columns and the settings its labels are read with
(e.g. box formats), and the storage dtype.
A folder is written under a temporary name and published by rename, so a crash never leaves a half cache.

The cache knows no task: it serves any ``ImageTextDataset`` whose examples are dataclasses with
``pixel_values``, ``text``, ``features`` and tensor labels (a task says whether its datasets qualify with
``Task.feature_cache``). The labels are stored beside the features, so a cached example needs no image
decoding at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlfuse.data.examples import BadExample, ImageTextDataset

CACHE_FORMAT_VERSION = 2
META_FILE = "cache.json"
# Example fields that are not labels: the image (replaced by its cached features) and the text.
_INPUT_FIELDS = ("pixel_values", "text", "features")


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


def cache_key(model, dataset: ImageTextDataset, split: str, dtype: str) -> dict[str, Any]:
    """Everything that changes the cached features or the examples they belong to."""
    key: dict[str, Any] = {
        "version": CACHE_FORMAT_VERSION,
        "dataset": dataset.cfg.dataset,
        "dataset_fingerprint": getattr(dataset.ds, "_fingerprint", None),
        "split": split,
        "rows": len(dataset.ds),
        "examples": len(dataset),
        "example_type": type(dataset.placeholder()).__name__,
        **dataset.cache_settings(),
        "dtype": dtype,
        "towers": {},
    }
    if not model.tower_is_trainable("image"):
        enc = model.image_encoder
        key["towers"]["image"] = {
            "name": enc.cfg.name,
            "weights": module_fingerprint(enc),
            "image_size": dataset.image_size,
            "mean": list(dataset.mean),
            "std": list(dataset.std),
            "interpolation": dataset.interpolation,
            "pooled": bool(model.fusion.uses_image_pooled),
        }
    if not model.tower_is_trainable("text"):
        enc = model.text_encoder
        vocab = json.dumps(enc.tokenizer.get_vocab(), sort_keys=True).encode()
        key["towers"]["text"] = {
            "name": enc.cfg.name,
            "weights": module_fingerprint(enc),
            "tokenizer": type(enc.tokenizer).__name__,
            "vocab": hashlib.sha256(vocab).hexdigest(),
            "max_length": enc.max_length,
        }
    return key


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@torch.no_grad()
def _compute(model, dataset: ImageTextDataset, folder: Path, dtype: str, batch_size: int, device) -> None:
    """Runs the frozen towers over every example of ``dataset`` and writes the arrays into ``folder``."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    n = len(dataset)
    image_frozen = not model.tower_is_trainable("image")
    text_frozen = not model.tower_is_trainable("text")
    labels = label_fields(dataset)
    arrays: dict[str, np.ndarray] = {
        name: np.zeros((n, *value.shape), value.numpy().dtype) for name, value in labels.items()
    }
    arrays["valid"] = np.zeros((n,), np.bool_)
    enc_img, enc_txt = model.image_encoder, model.text_encoder
    rows = [row for row, _ in dataset.index]
    unique_rows = sorted(set(rows))
    row_slot = {row: k for k, row in enumerate(unique_rows)}
    if image_frozen:
        arrays["image_row"] = np.array([row_slot[r] for r in rows], np.int64)
        arrays["image_tokens"] = np.lib.format.open_memmap(
            folder / "image_tokens.npy",
            "w+",
            np_dtype,
            (len(unique_rows), enc_img.num_tokens, enc_img.token_dim),
        )
        if model.fusion.uses_image_pooled:
            arrays["image_pooled"] = np.zeros((len(unique_rows), enc_img.pooled_dim), np_dtype)
    if text_frozen:
        t = enc_txt.max_length
        arrays["text_tokens"] = np.lib.format.open_memmap(
            folder / "text_tokens.npy", "w+", np_dtype, (n, t, enc_txt.dim)
        )
        arrays["text_mask"] = np.zeros((n, t), np.bool_)
        arrays["text_pooled"] = np.zeros((n, enc_txt.dim), np_dtype)
    was_training = model.training
    model.eval()
    done_rows: set[int] = set()
    progress = tqdm(total=n, desc=f"caching frozen features ({folder.name[:12]})", unit="ex")
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        examples = [dataset[i] for i in idx]
        for i, ex in zip(idx, examples, strict=True):
            if not isinstance(ex, BadExample):
                for name in labels:
                    arrays[name][i] = torch.as_tensor(getattr(ex, name)).numpy()
                arrays["valid"][i] = True
        if image_frozen:
            todo = []  # one image per row: expressions of the same row share its features
            for i, ex in zip(idx, examples, strict=True):
                if not isinstance(ex, BadExample) and rows[i] not in done_rows:
                    done_rows.add(rows[i])
                    todo.append((i, ex))
            if todo:
                pixels = torch.stack([ex.pixel_values for _, ex in todo]).to(device)
                out = enc_img(pixels, with_pooled=model.fusion.uses_image_pooled)
                slots = [row_slot[rows[i]] for i, _ in todo]
                arrays["image_tokens"][slots] = out.tokens.float().cpu().numpy().astype(np_dtype)
                if "image_pooled" in arrays:
                    arrays["image_pooled"][slots] = out.pooled.float().cpu().numpy().astype(np_dtype)
        if text_frozen:
            texts = [dataset.texts[i] for i in idx]
            tokens = enc_txt.tokenize(texts, padding="max_length")
            out = enc_txt(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            arrays["text_tokens"][idx] = out.tokens.float().cpu().numpy().astype(np_dtype)
            arrays["text_mask"][idx] = out.mask.cpu().numpy()
            arrays["text_pooled"][idx] = out.pooled.float().cpu().numpy().astype(np_dtype)
        progress.update(len(idx))
    progress.close()
    model.train(was_training)
    for name, array in arrays.items():
        if isinstance(array, np.memmap):
            array.flush()
        else:
            np.save(folder / f"{name}.npy", array)


@dataclass
class CachedDataset(Dataset):
    """The examples of a dataset with frozen towers' features (and the labels) read from a cache folder."""

    base: ImageTextDataset
    folder: Path

    def __post_init__(self) -> None:
        self.arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(self.folder.glob("*.npy"))}
        self.counts = self.base.counts
        self.labels = list(label_fields(self.base))
        self.example_type = type(self.base.placeholder())

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def describe(self) -> str:
        return self.base.describe() + f"; frozen features from {self.folder}"

    def __getitem__(self, i: int) -> Any:
        a = self.arrays
        if not a["valid"][i]:
            # Re-read the row to tell why (bad rows are few); the placeholder gets blank features.
            bad = self.base[i]
            bad = bad if isinstance(bad, BadExample) else self.base.bad("bad_row", f"example {i}")
            blank = {
                k: torch.zeros(a[k].shape[1:], dtype=torch.float32)
                for k in a
                if k.startswith(("image_t", "image_p", "text_t", "text_p"))
            }
            if "text_mask" in a:
                blank["text_mask"] = torch.zeros(a["text_mask"].shape[1:], dtype=torch.bool)
                blank["text_mask"][0] = True
            placeholder = bad.placeholder
            placeholder.features = blank
            if "image_tokens" in a:
                placeholder.pixel_values = None
            return bad
        features: dict[str, torch.Tensor] = {}
        if "image_tokens" in a:
            row = int(a["image_row"][i])
            features["image_tokens"] = torch.from_numpy(np.array(a["image_tokens"][row], dtype=np.float32))
            if "image_pooled" in a:
                features["image_pooled"] = torch.from_numpy(
                    np.array(a["image_pooled"][row], dtype=np.float32)
                )
            pixel_values = None
        else:
            live = self.base[i]
            if isinstance(live, BadExample):
                return live
            pixel_values = live.pixel_values
        if "text_tokens" in a:
            features["text_tokens"] = torch.from_numpy(np.array(a["text_tokens"][i], dtype=np.float32))
            features["text_mask"] = torch.from_numpy(np.array(a["text_mask"][i]))
            features["text_pooled"] = torch.from_numpy(np.array(a["text_pooled"][i], dtype=np.float32))
        labels = {name: torch.from_numpy(np.array(a[name][i])) for name in self.labels}
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
    """The cached version of ``dataset``: reuses a folder with the same key, or computes one (on the main
    process; the others wait and then read it)."""
    key = cache_key(model, dataset, split, dtype)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / f"{split}-{_digest(key)}"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (folder / META_FILE).is_file():
            tmp = root / f".tmp-{folder.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            device = accelerator.device
            model.to(device)
            _compute(model, dataset, tmp, dtype, batch_size, device)
            (tmp / META_FILE).write_text(json.dumps(key, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            accelerator.print(f"feature cache written: {folder} ({folder_size(folder) / 2**20:.1f} MiB)")
        elif accelerator.is_main_process:
            accelerator.print(f"feature cache reused: {folder} ({folder_size(folder) / 2**20:.1f} MiB)")
    return CachedDataset(dataset, folder)
