"""The feature cache keyed by content vs by row, side by side, on a VQA-style split (k questions per image).

    python benchmarks/feature_cache.py [--images 150] [--questions-per-image 4] [--image-size 160]

Writes a Hub-layout VQA-style dataset (``image``, ``question``, ``answer``; every image the row of k
questions, as VQAv2 has about 5.4 per image) to a temporary folder, then builds the frozen towers' cache
of its train split twice: keyed by content (vlfuse's cache) and keyed by row (the cache before content
keys: one image entry per row), and prints, per tower, the entries, the bytes and the build time of
each and their ratio. Then it trains the same short frozen run on each cache and prints both runs'
metrics, which must be equal. The image tower is timm's ``resnet18`` from random weights (the towers'
cost, not their accuracy, is measured; ``--image-encoder`` picks another); the text tower the bundled
2-layer BERT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import vlfuse.data.cache_build as cache_build  # noqa: E402
from vlfuse.config import load_config  # noqa: E402
from vlfuse.data.feature_cache import cached_dataset  # noqa: E402
from vlfuse.model import VLFuseModel  # noqa: E402
from vlfuse.tasks import get_task  # noqa: E402
from vlfuse.training import train  # noqa: E402

QUESTIONS = ["what colour is the shape?", "is there a circle?", "how many shapes are there?", "is it red?"]
ANSWERS = ["red", "yes", "2", "no"]


def write_split(root: Path, images: int, per_image: int) -> Path:
    rng = random.Random(0)
    rows: dict[str, list] = {"image": [], "question": [], "answer": []}
    for _ in range(images):
        image = Image.new("RGB", (96, 80), (rng.randint(0, 80),) * 3)
        x, y = rng.randint(0, 60), rng.randint(0, 50)
        ImageDraw.Draw(image).ellipse([x, y, x + 30, y + 25], fill=(rng.randint(100, 255), 40, 40))
        for q in range(per_image):
            rows["image"].append(image)
            rows["question"].append(QUESTIONS[q % len(QUESTIONS)] + ("" if q < len(QUESTIONS) else f" {q}"))
            rows["answer"].append(ANSWERS[q % len(ANSWERS)])
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    folder = root / "vqa_repeated"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        shard = str(folder / "data" / f"{split}-00000-of-00001.parquet")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(shard)
    return folder


def config(folder: Path, image_size: int, encoder: str, *extra: str):
    return load_config(
        overrides=[
            "model.task=vqa",
            "model.fusion.name=dense",
            "model.trainable_encoders=none",
            f"model.image_encoder.name={encoder}",
            "model.image_encoder.pretrained=false",
            f"model.image_encoder.image_size={image_size}",
            "model.text_encoder.name=vlfuse:tiny-bert",
            "model.text_encoder.pretrained=false",
            "model.text_encoder.max_length=24",
            "model.fusion.dim=64",
            "model.fusion.num_layers=2",
            f"data.dataset={folder}",
            "data.columns={image: image, question: question, answer: answer}",
            *extra,
        ]
    )


def by_row(dataset, i, pixel_values):
    """The cache before content keys: one image entry per dataset row."""
    return ("row", dataset.index[i][0])


@contextlib.contextmanager
def keys(keyed_by_row: bool):
    """With ``keyed_by_row``, the cache as it was before content keys: every row decoded, preprocessed and
    run through the tower (one entry per row)."""
    real = cache_build.image_content_key, cache_build.encoded_image_key
    if keyed_by_row:
        cache_build.image_content_key, cache_build.encoded_image_key = by_row, lambda *_: None
    try:
        yield
    finally:
        cache_build.image_content_key, cache_build.encoded_image_key = real


def build(cfg, root: Path, keyed_by_row: bool) -> dict[str, dict]:
    with keys(keyed_by_row):
        task = get_task(cfg.model.task)
        AcceleratorState._reset_state(True)
        task.prepare(cfg, Accelerator(cpu=True))
        model = VLFuseModel(cfg.model)
        dataset = task.build_dataset(cfg, model, "train", train=True)
        cached = cached_dataset(model, dataset, "train", root, "float32", 32, Accelerator(cpu=True))
        return cached.cache_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--questions-per-image", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3, help="builds of each cache (median time)")
    parser.add_argument("--image-encoder", default="resnet18", help="a timm model name (random weights)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vlfuse-cache-bench-"))
    try:
        folder = write_split(tmp, args.images, args.questions_per_image)
        cfg = config(folder, args.image_size, args.image_encoder)
        times: dict[str, list[float]] = {"content": [], "row": []}
        for r in range(args.repeats):  # alternating, so that neither build always runs first (warm-up)
            for name in ("content", "row") if r % 2 == 0 else ("row", "content"):
                stats = build(cfg, tmp / f"{name}_{r}", keyed_by_row=name == "row")
                times[name].append(stats["image"]["build_time_s"])
                if name == "content":
                    content = stats
                else:
                    per_row = stats
        for stats, name in ((content, "content"), (per_row, "row")):
            stats["image"]["build_time_s"] = statistics.median(times[name])
        print(f"image build times (s), {args.repeats} alternating repeats: {times}")
        k = args.questions_per_image
        shape = f"{args.images} images x {k} questions, {args.image_encoder} at {args.image_size} px"
        print(f"{shape}, frozen towers")
        c, r = content["image"], per_row["image"]
        print(
            f"image: by content {c['entries']:,} entries, {c['bytes'] / 2**20:.1f} MiB, "
            f"{c['build_time_s']:.1f} s | by row {r['entries']:,} entries, {r['bytes'] / 2**20:.1f} MiB, "
            f"{r['build_time_s']:.1f} s | ratio: bytes {c['bytes'] / r['bytes']:.3f}, "
            f"time {c['build_time_s'] / r['build_time_s']:.3f} (1/k = {1 / k:.3f})"
        )
        t = content["text"]
        print(
            f"text : {t['entries']:,} distinct token sequences for {t['examples']:,} examples "
            f"({t['bytes'] / 2**20:.2f} MiB; a per-example cache holds {t['examples']:,} entries)"
        )
        metrics = {}
        for name, keyed_by_row in (("content", False), ("row", True)):
            with keys(keyed_by_row):
                AcceleratorState._reset_state(True)
                start = time.perf_counter()
                run = config(
                    folder,
                    args.image_size,
                    args.image_encoder,
                    "train.cache_features=true",
                    f"train.cache_dir={tmp / ('run_' + name)}",
                    f"train.output_dir={tmp / ('out_' + name)}",
                    "train.max_steps=20",
                    "train.batch_size=16",
                )
                metrics[name] = train(run)["validation"]
                seconds = time.perf_counter() - start
                print(f"run on the cache keyed by {name}: {seconds:.1f} s, {metrics[name]}")
        same = all(metrics["content"][m] == metrics["row"][m] for m in ("accuracy", "majority_baseline"))
        print(f"metrics identical: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
