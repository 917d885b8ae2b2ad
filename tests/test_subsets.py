"""Parts of the train split: held-out rows (data.holdout) and nested training subsets (data.train_subset)."""

import json
import re

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_config
from test_recipes import SMALL_DATA

from vlfuse.data.subsets import example_rows, split_rows
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError, DataConfig
from vlfuse.tasks import get_task
from vlfuse.training import train
from vlfuse.training.data import build_split


def test_subsets_are_nested_and_never_touch_the_held_out_rows():
    parts = {n: split_rows(DataConfig(holdout=30, train_subset=n, subset_seed=4), 200) for n in (10, 40, 170)}
    held = {n: set(p["holdout"]) for n, p in parts.items()}
    assert held[10] == held[40] == held[170] and len(held[10]) == 30  # one holdout for every size
    train = {n: set(p["train"]) for n, p in parts.items()}
    assert [len(train[n]) for n in (10, 40, 170)] == [10, 40, 170]
    assert train[10] < train[40] < train[170]  # nested
    assert not train[170] & held[10] and train[170] | held[10] == set(range(200))
    # a fraction counts the rows left after the holdout; another seed draws other rows
    assert len(split_rows(DataConfig(holdout=0.1, train_subset=0.5), 200)["train"]) == 90
    assert split_rows(DataConfig(holdout=30, subset_seed=5), 200)["holdout"] != sorted(held[10])
    # no holdout, no subset: every row trains
    assert split_rows(DataConfig(), 7) == {"holdout": [], "train": list(range(7))}


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"train_subset": 500}, "'data.train_subset'; the split has 170 rows"),
        ({"train_subset": 10.5}, "'data.train_subset'; a row count must be a whole number"),
        ({"holdout": 200}, "data.holdout=200 leaves none"),
    ],
)
def test_parts_larger_than_the_split_name_the_key(settings, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        split_rows(DataConfig(**{"holdout": 30, **settings}), 200)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.eval_split=[holdout]"], "but data.holdout is 0"),
        (["data.train_subset=0"], "'data.train_subset'; must be > 0"),
        (["data.streaming=true", "train.max_steps=2", "data.train_subset=10"], "data.streaming=true"),
    ],
)
def test_refused_settings(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        tiny_config(*overrides)


def test_the_holdout_split_reads_exactly_the_held_out_rows():
    cfg = tiny_config(*SMALL_DATA, "data.holdout=12", "data.train_subset=20", "data.eval_split=[holdout]")
    model = VLFuseModel(cfg.model)
    task = get_task("grounding")
    accelerator = Accelerator(cpu=True)
    held = build_split(accelerator, cfg, task, model, "holdout", train=False)
    trained = build_split(accelerator, cfg, task, model, "train", train=True)
    parts = split_rows(cfg.data, 48)
    assert sorted({r for r in _rows(held)}) == parts["holdout"]
    assert sorted({r for r in _rows(trained)}) == parts["train"]
    _, per_example = example_rows(held.base)  # a shapes row has one or more expressions
    assert len(trained) == sum(r in set(parts["train"]) for r in per_example)
    assert trained.describe().startswith(f"train part: 20 of 48 rows -> {len(trained)} examples")
    assert held[0].box.shape == (4,)  # items are the split's own examples


def _rows(view):
    _, per_example = example_rows(view.base)
    return [per_example[i] for i in view.positions]


def test_frozen_runs_of_several_sizes_read_one_cache_of_the_whole_split(tmp_path, capsys):
    common = [
        *SMALL_DATA,
        "model.fusion.name=dense",
        "data.holdout=8",
        "data.eval_split=[holdout,validation]",
        "train.max_steps=2",
        "train.eval_every=2",
        "train.cache_features=true",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    verbs = {}
    for size in (16, 40):
        out_dir = tmp_path / str(size)
        metrics = train(tiny_config(*common, f"data.train_subset={size}", f"train.output_dir={out_dir}"))
        AcceleratorState._reset_state(True)
        verbs[size] = re.findall(r"feature cache (written|reused) \((\w+) tower\)", capsys.readouterr().out)
        assert set(metrics) == {"holdout", "validation"}
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["steps"] == 2
    # train split (training and its holdout) + validation, image + text: four folders, computed once
    assert len(list((tmp_path / "cache").iterdir())) == 4
    assert verbs[16].count(("written", "image")) == 2  # train and validation
    assert set(verbs[40]) == {("reused", "image"), ("reused", "text")}


def test_retrieval_evaluates_its_holdout_per_image(tmp_path):
    from helpers import write_flickr_layout

    folder = write_flickr_layout(tmp_path, rows_per_split=12)
    metrics = train(
        tiny_config(
            "model.task=retrieval",
            "model.fusion.name=projection",
            "data.columns.text=alt_text",
            f"data.dataset={folder}",
            "data.holdout=4",
            "data.eval_split=[holdout]",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.eval_every=2",
            f"train.output_dir={tmp_path / 'run'}",
        )
    )
    assert metrics["holdout"]["images"] == 4  # four held-out rows, one image each, with all their captions
    assert metrics["holdout"]["texts"] == 16


# ----------------------------------------------------------------------- per-seed subsets, by image
def test_each_seed_draws_its_own_nested_subset_and_the_held_out_rows_stay_fixed():
    def parts(seed, n):
        return split_rows(DataConfig(holdout=30, train_subset=n, subset_seed=4, train_subset_seed=seed), 200)

    held = {tuple(parts(seed, n)["holdout"]) for seed in (0, 1, 2) for n in (10, 40, 170)}
    assert len(held) == 1  # one held-out part for every seed and size
    for seed in (0, 1, 2):
        small, mid, whole = (set(parts(seed, n)["train"]) for n in (10, 40, 170))
        assert small < mid < whole and len(small) == 10 and len(mid) == 40  # nested within a seed
    assert len({tuple(parts(seed, 10)["train"]) for seed in (0, 1, 2)}) == 3  # each seed its own rows
    assert len({tuple(parts(seed, 170)["train"]) for seed in (0, 1, 2)}) == 1  # the whole pool: the same
    # no train_subset_seed: the held-out order's next rows, as before per-seed draws existed
    assert (
        split_rows(DataConfig(holdout=30, train_subset=10, subset_seed=4), 200)["train"]
        != parts(0, 10)["train"]
    )


def _refcoco_rows(root, embedded: bool, images: int = 12, per_image: int = 3):
    """A grounding train split in RefCOCO's layout: one row per expression, ``per_image`` rows per image
    (the image as a file path under an image root, or embedded bytes repeated in each row)."""
    import datasets
    from PIL import Image, ImageDraw

    (root / "images").mkdir()
    rows = {"image": [], "text": [], "box": []}
    for k in range(images):
        image = Image.new("RGB", (48, 40), (15 * k, 90, 60))
        ImageDraw.Draw(image).rectangle([4 + k, 5, 20 + k, 30], fill=(220, 30, 30))
        image.save(root / "images" / f"{k}.png")
        for e in range(per_image):
            rows["image"].append(
                {"bytes": (root / "images" / f"{k}.png").read_bytes(), "path": None}
                if embedded
                else f"{k}.png"
            )
            rows["text"].append(f"object {e} of image {k}")
            rows["box"].append([4.0 + k, 5.0, 21.0 + k, 31.0])
    features = datasets.Features(
        {
            "image": datasets.Image() if embedded else datasets.Value("string"),
            "text": datasets.Value("string"),
            "box": datasets.Sequence(datasets.Value("float32")),
        }
    )
    folder = root / "refcoco"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(folder / "data" / f"{split}-0.parquet")
        )
    return folder, [r // per_image for r in range(images * per_image)]  # each row's image


@pytest.mark.parametrize("embedded", [False, True], ids=["paths", "embedded"])
def test_no_image_of_the_held_out_rows_is_in_any_trials_training_rows(tmp_path, embedded):
    folder, image_of = _refcoco_rows(tmp_path, embedded)
    task = get_task("grounding")
    seen_held = set()
    for seed in (0, 1, 2):
        for size in (5, 16):
            cfg = tiny_config(
                f"data.dataset={folder}",
                f"data.image_root={tmp_path / 'images'}",
                "data.holdout=7",
                f"data.train_subset={size}",
                f"data.train_subset_seed={seed}",
            )
            model = VLFuseModel(cfg.model)
            held = build_split(Accelerator(cpu=True), cfg, task, model, "holdout", train=False)
            trained = build_split(Accelerator(cpu=True), cfg, task, model, "train", train=True)
            held_images = {image_of[r] for r in _rows(held)}
            train_images = {image_of[r] for r in _rows(trained)}
            assert not held_images & train_images
            assert len(_rows(held)) == 9  # whole images (3 rows each) until at least 7 rows
            assert len(set(_rows(trained))) >= size
            seen_held.add(frozenset(held_images))
    assert len(seen_held) == 1  # the held-out images are the study's, whatever the seed


def test_the_vqa_vocabulary_of_a_trial_holds_no_answer_found_only_in_held_out_rows(tmp_path):
    import datasets

    from vlfuse.data.subsets import image_groups

    folder = tmp_path / "vqa"
    (folder / "data").mkdir(parents=True)
    from PIL import Image

    data = {"image": [], "question": [], "answers": []}
    for i in range(16):
        data["image"].append(Image.new("RGB", (40, 32), (10 * i, 20, 200)))
        data["question"].append("what is it?")
        data["answers"].append([f"only-{i}", "box"])
    datasets.Dataset.from_dict(data).to_parquet(str(folder / "data" / "train-0.parquet"))
    cfg = tiny_config(
        "model.task=vqa",
        "model.fusion.name=concat",
        f"data.dataset={folder}",
        "data.columns={image: image, question: question, answer: answers}",
        "data.holdout=4",
        "data.train_subset=8",
        "data.train_subset_seed=1",
        "data.num_answers=100",
        "data.eval_split=holdout",
    )
    task = get_task("vqa")
    task.prepare(cfg, Accelerator(cpu=True))
    ds = datasets.load_dataset(str(folder), split="train")
    parts = split_rows(cfg.data, image_groups(ds, cfg.data, "image"))
    vocab = set(cfg.model.answers)
    assert {f"only-{r}" for r in parts["train"]} <= vocab  # the trial's own rows' answers
    assert not {f"only-{r}" for r in parts["holdout"]} & vocab  # no held-out answer
    assert not {f"only-{r}" for r in set(range(16)) - set(parts["train"]) - set(parts["holdout"])} & vocab


def test_itm_negatives_of_held_out_rows_come_from_held_out_rows(tmp_path):
    from helpers import write_flickr_layout

    folder = write_flickr_layout(tmp_path, rows_per_split=16)
    cfg = tiny_config(
        "model.task=itm",
        "model.fusion.name=concat",
        "data.columns={image: image, text: alt_text}",
        f"data.dataset={folder}",
        "data.holdout=5",
        "data.eval_split=holdout",
    )
    model = VLFuseModel(cfg.model)
    held = build_split(Accelerator(cpu=True), cfg, get_task("itm"), model, "holdout", train=False)
    held_texts = set(held.texts)
    negatives = [held[i].negative for i in range(len(held))]
    assert negatives and set(negatives) <= held_texts
    assert all(held[i].negative != held[i].text for i in range(len(held)))
