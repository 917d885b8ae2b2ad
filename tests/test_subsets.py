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
