"""Loading a split by ``data.dataset``: a Hub id, a local folder (Hub layout or ``save_to_disk``), or the
embedded dataset's name."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import datasets
from PIL import ExifTags, Image, ImageOps

from vlfuse.data import shapes
from vlfuse.schema import DataConfig


class DataError(ValueError):
    """The data does not match the config: a missing split, column or image file."""


def _shapes_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    sizes = {"train": cfg.shapes_train_size, "validation": cfg.shapes_eval_size, "test": cfg.shapes_eval_size}
    if split not in sizes:
        raise DataError(
            f"the embedded dataset {shapes.NAME!r} has no split {split!r}; splits: {sorted(sizes)}"
        )
    # Distinct seeds per split: no image is shared between train and evaluation.
    seed = cfg.shapes_seed * 1000 + {"train": 0, "validation": 1, "test": 2}[split]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Sequence(datasets.Value("string")),
            "box": datasets.Sequence(datasets.Value("float32"), length=4),
            "num_objects": datasets.Value("int32"),
            "object_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
            "captions": datasets.Sequence(datasets.Value("string")),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
        }
    )
    # from_generator caches the result under HF_HOME keyed by the arguments: generated once per machine.
    return datasets.Dataset.from_generator(
        shapes.generate,
        gen_kwargs={
            "num_images": sizes[split],
            "seed": seed,
            "size": cfg.shapes_image_size,
            "version": shapes.generator_version(),
        },
        features=features,
        split=datasets.NamedSplit(split),
    )


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def available_splits(cfg: DataConfig) -> list[str]:
    """The split names of ``data.dataset`` (reads metadata only where it can)."""
    if cfg.dataset == shapes.NAME:
        return ["train", "validation", "test"]
    path = Path(cfg.dataset).expanduser()
    if path.is_dir() and _is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        return list(loaded.keys()) if isinstance(loaded, datasets.DatasetDict) else ["train"]
    return list(
        datasets.get_dataset_split_names(
            str(path) if path.is_dir() else cfg.dataset, cfg.subset, revision=cfg.revision
        )
    )


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def parse_split(split: str) -> tuple[str, slice | None]:
    """``"test[1000:]"`` -> ``("test", slice(1000, None))``; a plain name has no slice.

    Raises:
        DataError: for brackets that are not a ``[start:stop]`` row slice.
    """
    if "[" not in split:
        return split, None
    match = _SLICE.match(split)
    if match is None:
        raise DataError(f"split {split!r}: a slice must look like name[start:stop], e.g. test[:1000]")
    start, stop = (int(v) if v else None for v in (match["start"], match["stop"]))
    return match["name"], slice(start, stop)


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """One split of ``data.dataset`` as a ``datasets.Dataset``; ``name[start:stop]`` selects those rows.

    Raises:
        DataError: if the split does not exist (the message lists the splits there are) or its slice is
            empty.
    """
    name, rows = parse_split(split)
    ds = _load_whole_split(cfg, name)
    if rows is None:
        return ds
    selected = range(len(ds))[rows]
    if len(selected) == 0:
        raise DataError(f"split {split!r} selects no rows: {name!r} has {len(ds)} rows")
    return ds.select(selected)


def _source(cfg: DataConfig, split: str) -> str:
    """What ``load_dataset`` reads for ``data.dataset`` (a local folder's path, or the Hub id), once
    ``split`` is known to exist.

    Raises:
        DataError: the split does not exist (the message lists the splits there are).
    """
    splits = available_splits(cfg)
    if split not in splits:
        raise DataError(f"dataset {cfg.dataset!r} has no split {split!r}; its splits: {splits}")
    path = Path(cfg.dataset).expanduser()
    return str(path) if path.is_dir() else cfg.dataset


def _load_whole_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    if cfg.dataset == shapes.NAME:
        return _shapes_split(cfg, split)
    source = _source(cfg, split)
    if _is_saved_to_disk(Path(source)):
        loaded = datasets.load_from_disk(source)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(source, cfg.subset, split=split, revision=cfg.revision)


# Shards of a stream made from a map-style dataset (embedded or save_to_disk): enough for 2 processes x 4
# DataLoader workers each to read whole shards.
STREAM_SHARDS = 8


def stream_split(cfg: DataConfig, split: str) -> datasets.IterableDataset:
    """One split of ``data.dataset`` as a ``datasets.IterableDataset`` that reads rows as it goes: a Hub id
    or local data files (parquet, JSON, CSV, ...) through ``load_dataset(..., streaming=True)``; a
    ``save_to_disk`` folder or the embedded dataset through ``to_iterable_dataset``. ``name[start:stop]``
    skips and takes rows. Image columns stay undecoded (``{bytes, path}``): examples decode them, so that
    a damaged image is a counted bad row, not an exception inside ``datasets``.

    Raises:
        DataError: a split that does not exist, or a slice counted from the end (a stream has no length).
    """
    name, rows = parse_split(split)
    if rows is not None and ((rows.start or 0) < 0 or (rows.stop is not None and rows.stop < 0)):
        raise DataError(f"split {split!r}: a streamed split can only be sliced from its start (no negatives)")
    path = Path(cfg.dataset).expanduser()
    if cfg.dataset == shapes.NAME or (path.is_dir() and _is_saved_to_disk(path)):
        stream = _load_whole_split(cfg, name).to_iterable_dataset(num_shards=STREAM_SHARDS)
    else:
        source = _source(cfg, name)
        stream = datasets.load_dataset(source, cfg.subset, split=name, revision=cfg.revision, streaming=True)
    if rows is not None:
        start = rows.start or 0
        stream = stream.skip(start) if start else stream
        stream = stream.take(rows.stop - start) if rows.stop is not None else stream
    image_column = cfg.columns.get("image")
    feature = (stream.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    return stream


def stream_head(cfg: DataConfig, split: str, rows: int, columns: list[str] | None = None) -> datasets.Dataset:
    """The first ``rows`` rows of a streamed split (only ``columns``, if given) as a ``datasets.Dataset``.

    Raises:
        DataError: if the split has no rows.
    """
    stream = stream_split(cfg, split)
    if columns is not None:
        missing = [c for c in columns if stream.column_names is not None and c not in stream.column_names]
        if missing:
            raise DataError(
                f"column(s) {missing} not in dataset {cfg.dataset!r}[{split}]; "
                f"its columns: {stream.column_names}"
            )
        stream = stream.select_columns(columns)
    head = list(stream.take(rows))
    if not head:
        raise DataError(f"the streamed split {cfg.dataset!r}[{split}] has no rows")
    features = stream.features
    return datasets.Dataset.from_list(head, features=features)


def check_columns(
    ds: datasets.Dataset, columns: dict[str, str], required: tuple[str, ...], dataset: str
) -> None:
    """Every task field in ``required`` must map to a column of ``ds``."""
    for field in required:
        if field not in columns:
            raise DataError(f"data.columns has no entry for {field!r}; it needs: {list(required)}")
        if columns[field] not in ds.column_names:
            raise DataError(
                f"column {columns[field]!r} (data.columns.{field}) is not in dataset {dataset!r}; "
                f"its columns: {ds.column_names}"
            )


def load_image(value: Any, image_root: str | None) -> Image.Image:
    """An RGB PIL image from a decoded image, a ``{bytes, path}`` dict, raw bytes or a path string.

    Raises:
        DataError: a missing file (the message names the path and ``data.image_root``) or undecodable bytes.
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open(io.BytesIO(value["bytes"]), "image bytes")
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return _open(io.BytesIO(value), "image bytes")
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root).expanduser() / path
        if not path.is_file():
            hint = "" if image_root else " (set data.image_root to the folder that relative paths start from)"
            raise DataError(f"image file not found: {path}{hint}")
        return _open(path, str(path))
    raise DataError(f"cannot read an image from a value of type {type(value).__name__}")


def _open(source: Any, what: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            # As datasets' own decoding does: a photo's EXIF orientation is applied.
            if im.getexif().get(ExifTags.Base.Orientation) is not None:
                return ImageOps.exif_transpose(im).convert("RGB")
            return im.convert("RGB")
    except Exception as err:  # PIL raises several types for damaged data
        raise DataError(f"cannot decode {what}: {err}") from err
