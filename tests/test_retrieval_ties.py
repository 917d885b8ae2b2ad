"""Identical inputs score identically in retrieval evaluation: each distinct caption and image is embedded
once and every row reads its entry, so tie-aware recall counts duplicate captions as ties (on one and two
processes), checked against an independent tie-aware recall (scipy's hypergeometric distribution)."""

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_config
from PIL import Image
from scipy.stats import hypergeom

from vlfuse.model import VLFuseModel
from vlfuse.tasks import get_task
from vlfuse.tasks.retrieval import retrieval_metrics
from vlfuse.training.data import build_eval_loaders
from vlfuse.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = ["model.task=retrieval", "model.fusion.name=projection", "data.columns.text=text"]
SURF = "a man riding a wave on top of a surfboard"  # repeated across images in COCO and Flickr30k
# Six images (row 4 has row 0's pixels) with their captions; at 2 rows a batch, SURF is in every batch,
# padded to a different length each time; "purple" is twice in one row.
COLOURS = [(200, 0, 0), (0, 0, 200), (0, 160, 0), (220, 220, 0), (200, 0, 0), (120, 0, 160)]
CAPTIONS = [
    [SURF, "red"],
    ["a blue square on a grey background with a rather long caption", "blue"],
    ["green", SURF],
    [SURF, "a yellow thing"],
    ["red again", "a red square seen twice in this split"],
    ["purple", SURF, "purple"],
]
# max_length 48: no caption is cut (the tiny tokenizer spells SURF in 30 tokens), so padding differs.
BATCH = ["train.eval_batch_size=2", "model.text_encoder.max_length=48"]


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(root: Path) -> Path:
    folder = root / "dup_captions"
    (folder / "data").mkdir(parents=True)
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "text": datasets.Sequence(datasets.Value("string"))}
    )
    rows = {"image": [{"bytes": _png(c), "path": None} for c in COLOURS], "text": CAPTIONS}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "validation-00000-of-00001.parquet")
    )
    return folder


def _tie_aware_reference(similarity: torch.Tensor, row_owner, column_owner, k: int) -> float:
    """Mean over rows of the chance that a positive column is in the top k when tied scores come in a
    random order: the columns above the best positive take their places first; the rest go to the tied
    block (t negatives, m positives), which misses every positive with the hypergeometric probability of
    drawing 0 of m positives in min(places, t + m) draws."""
    hits = []
    for r, scores in enumerate(similarity):
        positive = column_owner == row_owner[r]
        best = scores[positive].max()
        above = int((scores[~positive] > best).sum())
        tied_neg, tied_pos = int((scores[~positive] == best).sum()), int((scores[positive] == best).sum())
        places = k - above
        if places <= 0:
            hits.append(0.0)
        else:
            draws = min(places, tied_neg + tied_pos)
            hits.append(1.0 - hypergeom(tied_neg + tied_pos, tied_pos, draws).pmf(0))
    return sum(hits) / len(hits)


def _reference_metrics(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor) -> dict:
    similarity = images @ texts.T
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_r@{k}"] = _tie_aware_reference(similarity, torch.arange(len(images)), text_image, k)
        out[f"t2i_r@{k}"] = _tie_aware_reference(similarity.T, text_image, torch.arange(len(images)), k)
    return out


def test_duplicate_rows_are_ties_in_a_hand_made_pattern():
    # Images are the axes e0, e1, e2. Texts: t0 (image 0) and t1 (image 1) are one caption, v = (1, 1, 0)
    # / sqrt(2); t2 = e2 (image 2); t3 = (1, 0, 0.5) / sqrt(1.25) (image 0). Scores (image x text):
    #   image 0: .707 .707 0 .894 -> its t3 first: hit@1 = 1
    #   image 1: .707 .707 0 0    -> its t1 tied with t0 (a negative) at the top: hit@1 = 1/2
    #   image 2: 0 0 1 0          -> hit@1 = 1;      i2t R@1 = (1 + 1/2 + 1) / 3 = 5/6
    #   t0: images 0 and 1 tie (0 is its own) -> 1/2; t1: the same tie -> 1/2; t2 -> 1; t3 -> 1
    #   t2i R@1 = (1/2 + 1/2 + 1 + 1) / 4 = 3/4; with 3 images every R@5 and R@10 is 1.
    v = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    texts = torch.stack(
        [v, v.clone(), torch.tensor([0.0, 0.0, 1.0]), F.normalize(torch.tensor([1.0, 0, 0.5]), dim=0)]
    )
    owner = torch.tensor([0, 1, 2, 0])
    for chunk in (1, 2, 1024):  # the duplicate rows in different chunks, or in one
        m = retrieval_metrics(torch.eye(3), texts, owner, chunk=chunk)
        assert m["i2t_r@1"] == pytest.approx(5 / 6) and m["t2i_r@1"] == pytest.approx(3 / 4)
        assert m["i2t_r@5"] == m["t2i_r@10"] == 1.0


def test_identical_rows_tie_wherever_the_product_puts_them():
    """A duplicate caption among many texts: its two rows (far apart, in different tiles of the matrix
    product) are one entry, so the image queries see an exact tie, as the reference counts it."""
    torch.manual_seed(3)
    images = F.normalize(torch.randn(37, 24), dim=-1)
    owner = torch.cat([torch.arange(37), torch.randint(0, 37, (33,))])  # every image has a caption
    texts = F.normalize(images[owner] + 0.9 * torch.randn(70, 24), dim=-1)
    texts[61] = texts[2]  # the same caption for two images
    got = retrieval_metrics(images, texts, owner, chunk=16)
    expected = _reference_metrics(images, texts, owner)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def _eval_values(tmp_path, *overrides):
    """The values and metrics of one-process evaluation of a tiny model on the split, and the captions
    (unpadded token ids) and images the towers ran on."""
    folder = _write_split(tmp_path)
    cfg = tiny_config(*RETRIEVAL, f"data.dataset={folder}", *BATCH, *overrides)
    model = VLFuseModel(cfg.model)
    ran_texts, ran_images = [], []
    model.text_encoder.register_forward_pre_hook(
        lambda _m, args: ran_texts.extend(tuple(r[m.bool()].tolist()) for r, m in zip(*args, strict=True))
    )
    model.image_encoder.register_forward_pre_hook(lambda _m, args: ran_images.extend(args[0]))
    accelerator = Accelerator(cpu=True)
    task = get_task("retrieval")
    try:
        (loader,) = build_eval_loaders(accelerator, cfg, task, model).values()
        model.eval()
        with torch.no_grad():
            values = task.eval_loop(accelerator, model, loader)
        metrics = task.metrics(values)
        ran = list(ran_texts), list(ran_images)
        assert evaluate(accelerator, model, task, loader) == {**metrics, "bad_rows": 0}  # the same path
    finally:
        AcceleratorState._reset_state(True)
    return model, values, metrics, *ran


def _rows_of(caption: str) -> list[tuple[int, int]]:
    return [(i, j) for i, row in enumerate(CAPTIONS) for j, c in enumerate(row) if c == caption]


def _check_duplicates_equal(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> None:
    for caption in (SURF, "purple"):
        rows = [text_embeds[i, j] for i, j in _rows_of(caption)]
        assert len(rows) >= 2 and all(torch.equal(rows[0], r) for r in rows[1:]), caption
    assert torch.equal(image_embeds[0], image_embeds[4])  # the same pixels in two rows


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
def test_duplicate_captions_in_different_batches_score_alike_and_run_the_tower_once(tmp_path, cached):
    # Cached: the frozen towers' features come from the feature cache (its build runs the towers).
    cache = [
        "model.trainable_encoders=none",
        "train.cache_features=true",
        f"train.cache_dir={tmp_path / 'c'}",
    ]
    model, values, metrics, ran_texts, ran_images = _eval_values(
        tmp_path, *(cache if cached else ["model.trainable_encoders=all"])
    )
    assert values["text_embeds"].shape[:2] == (6, 3) and values["valid"].all()
    _check_duplicates_equal(values["text_embeds"], values["image_embeds"])

    # Each distinct caption (as token ids) ran through the text tower once, each distinct image through
    # the image tower once: live, the padding slots' empty caption too; cached, the cache's build (the
    # padding slots read blank features).
    texts = [c for row in CAPTIONS for c in row] + ([] if cached else [""])
    tokens = model.text_encoder.tokenize(texts)
    distinct = {
        tuple(r[m.bool()].tolist())
        for r, m in zip(tokens["input_ids"], tokens["attention_mask"], strict=True)
    }
    assert len(distinct) == len(set(texts)) == (9 if cached else 10)
    assert Counter(ran_texts) == Counter(distinct)
    assert len(ran_images) == 5

    # Recall equals the independent tie-aware reference on embeddings made one distinct input at a time
    # (through the public API), where the duplicates are one row by construction.
    with torch.no_grad():
        by_caption = {c: model.embed_texts([c])[0] for c in set(texts)}
        by_colour = {c: model.embed_images([Image.open(io.BytesIO(_png(c)))])[0] for c in set(COLOURS)}
    flat = [c for row in CAPTIONS for c in row]
    expected = _reference_metrics(
        torch.stack([by_colour[c] for c in COLOURS]),
        torch.stack([by_caption[c] for c in flat]),
        torch.arange(6).repeat_interleave(torch.tensor([len(r) for r in CAPTIONS])),
    )
    assert metrics["texts"] == len(flat) and metrics["images"] == 6
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("launch_config", ["cpu_2proc", "cpu_2proc_fsdp"], ids=["ddp", "fsdp2"])
def test_on_two_processes_duplicates_score_alike_and_each_caption_runs_once(tmp_path, launch_config):
    folder = _write_split(tmp_path)
    out = tmp_path / "ranks.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / f"recipes/configs/accelerate/{launch_config}.yaml"),
            str(ROOT / "tests/scripts/retrieval_eval_ranks.py"),
            str(folder),
            str(out),
            *RETRIEVAL,
            *BATCH,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    values = {k: torch.tensor(v) for k, v in ranks[0]["values"].items()}
    assert values["text_embeds"].shape[:2] == (6, 3)  # all six rows, in the split's order, once
    _check_duplicates_equal(values["text_embeds"], values["image_embeds"])

    # Every distinct caption ran on one of the two processes, once, except the one row a process with
    # nothing new in a batch runs to keep step with the other (at most one per batch and process).
    ran = Counter(tuple(r) for rank in ranks for r in rank["ran"])
    assert len(ran) == 10
    repeats = sum(n - 1 for n in ran.values())
    assert repeats <= sum(rank["steps"] for rank in ranks)

    valid = values["text_valid"].bool()
    owner = torch.arange(6).repeat_interleave(valid.sum(1))
    expected = _reference_metrics(values["image_embeds"], values["text_embeds"][valid], owner)
    for key, value in expected.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_retrieval_evaluates_from_the_prefix_cache_as_it_does_live(tmp_path):
    """A tower that trains its last blocks evaluates from its cached frozen prefix: the evaluation keys its
    images by that input (it once found no image input in the batch and failed) and scores as the live run."""
    from vlfuse.config import load_config
    from vlfuse.training import train

    metrics = {}
    for cache in ("true", "false"):
        cfg = load_config(
            "vlfuse/configs/retrieval/shapes.yaml",
            [
                "model.trainable_encoders=all",
                "model.image_encoder.tuning=last_blocks",
                "model.text_encoder.tuning=last_blocks",
                f"train.cache_features={cache}",
                "train.max_steps=2",
                "train.eval_every=2",
                "train.batch_size=8",
                f"train.output_dir={tmp_path / cache}",
                f"train.cache_dir={tmp_path / 'cache'}",
                "data.shapes_train_size=32",
                "data.shapes_eval_size=16",
            ],
        )
        metrics[cache] = train(cfg)["validation"]
    assert list((tmp_path / "cache").glob("validation-image_prefix-*"))  # the cached run read the prefix
    for key in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5", "mean_recall"):
        assert abs(metrics["true"][key] - metrics["false"][key]) < 1e-5, key
