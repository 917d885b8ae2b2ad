"""Writers of tiny local datasets in the layouts of real Hub grounding datasets."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
from PIL import Image, ImageDraw


def _image(rng: random.Random, w: int, h: int) -> tuple[Image.Image, list[float]]:
    image = Image.new("RGB", (w, h), (rng.randint(0, 60),) * 3)
    bw, bh = rng.randint(8, w // 2), rng.randint(8, h // 2)
    x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    ImageDraw.Draw(image).rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=(230, 40, 40))
    return image, [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]


def write_jxu124_layout(root: Path, rows_per_split: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """jxu124/refcoco: ``image_path`` into COCO train2014 (under an image root), ``bbox`` absolute xyxy,
    ``captions`` a list; splits train/validation/test/testB as Hub parquet shards.

    Returns:
        (dataset folder, image root)
    """
    rng = random.Random(seed)
    dataset_dir, image_root = root / "refcoco", root / "coco_root"
    (dataset_dir / "data").mkdir(parents=True)
    (image_root / "coco" / "train2014").mkdir(parents=True)
    counter = 0
    for split in ("train", "validation", "test", "testB"):
        rows = {"image_path": [], "bbox": [], "captions": [], "image_id": [], "sent_ids": []}
        for _ in range(rows_per_split):
            image, box = _image(rng, rng.randint(60, 120), rng.randint(50, 110))
            rel = f"coco/train2014/COCO_train2014_{counter:012d}.jpg"
            image.save(image_root / rel)
            rows["image_path"].append(rel)
            rows["bbox"].append(box)
            rows["captions"].append(["the red box", "red rectangle"][: rng.randint(1, 2)])
            rows["image_id"].append(counter)
            rows["sent_ids"].append([counter])
            counter += 1
        datasets.Dataset.from_dict(rows).to_parquet(
            str(dataset_dir / "data" / f"{split}-00000-of-00001.parquet")
        )
    return dataset_dir, image_root


def write_lmms_layout(root: Path, rows_per_split: int = 10, seed: int = 1) -> Path:
    """lmms-lab/RefCOCO: embedded ``image``, ``bbox`` absolute xywh, expressions in ``answer`` (a list),
    a ``question`` prompt; splits val/test/testA/testB and no train."""
    rng = random.Random(seed)
    dataset_dir = root / "lmms_refcoco"
    (dataset_dir / "data").mkdir(parents=True)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Sequence(datasets.Value("string")),
            "bbox": datasets.Sequence(datasets.Value("float32")),
            "file_name": datasets.Value("string"),
        }
    )
    for split in ("val", "test", "testA", "testB"):
        rows = {k: [] for k in features}
        for i in range(rows_per_split):
            image, (x0, y0, x1, y1) = _image(rng, rng.randint(60, 120), rng.randint(50, 110))
            rows["question_id"].append(f"{split}-{i}")
            rows["image"].append(image)
            rows["question"].append(
                "Please provide the bounding box coordinate of the region this sentence describes:"
            )
            rows["answer"].append(["red box", "the red one"])
            rows["bbox"].append([x0, y0, x1 - x0, y1 - y0])
            rows["file_name"].append(f"{i}.jpg")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(dataset_dir / "data" / f"{split}-00000-of-00001.parquet")
        )
    return dataset_dir


def write_flickr_layout(root: Path, rows_per_split: int = 8, seed: int = 2) -> Path:
    """AnyModal/flickr30k: embedded ``image``, ``alt_text`` a list of five captions, ``split``, ``img_id``;
    splits train/validation/test. (lmms-lab/flickr30k is the same with ``caption`` and only ``test``.)"""
    rng = random.Random(seed)
    dataset_dir = root / "flickr30k"
    (dataset_dir / "data").mkdir(parents=True)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "alt_text": datasets.Sequence(datasets.Value("string")),
            "sentids": datasets.Sequence(datasets.Value("string")),
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )
    for split in ("train", "validation", "test"):
        rows = {k: [] for k in features}
        for i in range(rows_per_split):
            image, _ = _image(rng, rng.randint(60, 120), rng.randint(50, 110))
            rows["image"].append(image)
            rows["alt_text"].append([f"a red box number {i} on grey", f"picture {i}", "", "red", "a box"])
            rows["sentids"].append([str(5 * i + k) for k in range(5)])
            rows["split"].append(split)
            rows["img_id"].append(str(i))
            rows["filename"].append(f"{i}.jpg")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(dataset_dir / "data" / f"{split}-00000-of-00001.parquet")
        )
    return dataset_dir


def write_vqav2_layout(root: Path, rows: int = 24, seed: int = 3) -> Path:
    """VQAv2 on the Hub (merve/vqav2-small and the full sets): embedded ``image``, ``question``,
    ``multiple_choice_answer`` (a string) and ``answers`` (ten ``{answer, answer_confidence, answer_id}``
    dicts); merve/vqav2-small has only a ``validation`` split."""
    rng = random.Random(seed)
    dataset_dir = root / "vqav2"
    (dataset_dir / "data").mkdir(parents=True)
    data = {"image": [], "question": [], "multiple_choice_answer": [], "answers": []}
    for i in range(rows):
        image, _ = _image(rng, rng.randint(60, 120), rng.randint(50, 110))
        data["image"].append(image)
        data["question"].append(rng.choice(["what colour is the box?", "is there a box?", "how many boxes?"]))
        main = rng.choice(["red", "yes", "1"])
        given = [main] * rng.randint(4, 10) + ["Rare answer " + str(i)]
        given = (given + ["no"] * 10)[:10]
        data["multiple_choice_answer"].append(main)
        data["answers"].append(
            [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(given)]
        )
    datasets.Dataset.from_dict(data).to_parquet(
        str(dataset_dir / "data" / "validation-00000-of-00001.parquet")
    )
    return dataset_dir


def write_sharded_grounding(root: Path, rows: int = 40, shards: int = 4, seed: int = 2) -> Path:
    """Grounding rows as Hub parquet shards (``data/train-0000k-of-0000n.parquet``) and one validation
    shard: an embedded ``image``, a unique ``text`` list per row (one or two expressions, ``row<i>-<k>``)
    and an absolute xyxy ``box``. Rows are numbered across shards in order."""
    rng = random.Random(seed)
    folder = root / "sharded"
    (folder / "data").mkdir(parents=True)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Sequence(datasets.Value("string")),
            "box": datasets.Sequence(datasets.Value("float32"), length=4),
        }
    )
    per_shard = -(-rows // shards)
    for split, n_shards in (("train", shards), ("validation", 1)):
        total = rows if split == "train" else 8
        for s in range(n_shards):
            part = {k: [] for k in features}
            for i in range(s * per_shard, min(total, (s + 1) * per_shard) if split == "train" else total):
                image, box = _image(rng, rng.randint(50, 90), rng.randint(50, 90))
                part["image"].append(image)
                part["text"].append([f"{split} row{i}-{k}" for k in range(rng.randint(1, 2))])
                part["box"].append(box)
            name = f"{split}-{s:05d}-of-{n_shards:05d}.parquet"
            datasets.Dataset.from_dict(part, features=features).to_parquet(str(folder / "data" / name))
    return folder


class CrashAfterCheckpoint(Exception):
    """The fault ``train_until_crash_after_checkpoint`` injects."""


def train_until_crash_after_checkpoint(monkeypatch, cfg, step: int) -> None:
    """Runs ``train(cfg)`` and kills it (an exception) right after its step-``step`` checkpoint is
    published, as a crash or pre-emption would."""
    import pytest

    import vlfuse.training.loop as loop
    from vlfuse.training import train

    real_save = loop.save_checkpoint

    def save_then_crash(accelerator, output_dir, state, keep_last, **kwargs):
        path = real_save(accelerator, output_dir, state, keep_last, **kwargs)
        if state["step"] == step:
            raise CrashAfterCheckpoint
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(CrashAfterCheckpoint):
            train(cfg)
    finally:
        monkeypatch.setattr(loop, "save_checkpoint", real_save)
