import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_config
from test_recipes import SMALL_DATA, launch

from vlfuse.config import ConfigError
from vlfuse.data.feature_cache import cached_dataset
from vlfuse.model import VLFuseModel
from vlfuse.tasks import get_task
from vlfuse.tasks.grounding import GroundingTask
from vlfuse.training import train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _cached(tmp_path, mode="none", dtype="float32", *extra):
    cfg = tiny_config(*SMALL_DATA, "model.fusion.name=concat", f"model.trainable_encoders={mode}", *extra)
    model = VLFuseModel(cfg.model)
    live = GroundingTask().build_dataset(cfg, model, "validation", train=False)
    cached = cached_dataset(model, live, "validation", tmp_path / "cache", dtype, 8, Accelerator(cpu=True))
    return model, live, cached


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float16", 2e-2)])
def test_cached_features_equal_live_ones(tmp_path, dtype, tol):
    model, live, cached = _cached(tmp_path, "none", dtype)
    model.eval()
    for i in (0, 3, len(live) - 1):
        ex, cex = live[i], cached[i]
        assert cex.pixel_values is None and torch.equal(ex.box, cex.box) and torch.equal(ex.meta, cex.meta)
        with torch.no_grad():
            image = model.image_encoder(ex.pixel_values[None])
            tokens = model.text_encoder.tokenize([ex.text])
            text = model.text_encoder(**tokens)
        torch.testing.assert_close(cex.features["image_tokens"], image.tokens[0], atol=tol, rtol=tol)
        torch.testing.assert_close(cex.features["image_pooled"], image.pooled[0], atol=tol, rtol=tol)
        n = int(tokens["attention_mask"].sum())
        assert cex.features["text_mask"][:n].all() and not cex.features["text_mask"][n:].any()
        torch.testing.assert_close(cex.features["text_tokens"][:n], text.tokens[0, :n], atol=tol, rtol=tol)
        torch.testing.assert_close(cex.features["text_pooled"], text.pooled[0], atol=tol, rtol=tol)


def test_only_the_frozen_tower_is_cached(tmp_path):
    _, _, image_frozen = _cached(tmp_path, "text")
    assert {
        "image_tokens",
        "image_row",
    } <= image_frozen.arrays.keys() and "text_tokens" not in image_frozen.arrays
    assert image_frozen[0].pixel_values is None and "input_ids" not in image_frozen[0].features
    AcceleratorState._reset_state(True)
    _, _, text_frozen = _cached(tmp_path, "image")
    assert "text_tokens" in text_frozen.arrays and "image_tokens" not in text_frozen.arrays
    assert text_frozen[0].pixel_values is not None


def test_key_changes_recompute_and_same_key_reuses(tmp_path):
    _, _, first = _cached(tmp_path)
    stamp = (first.folder / "cache.json").stat().st_mtime_ns
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)  # the same random init: the same weights
    _, _, again = _cached(tmp_path)
    assert again.folder == first.folder and (again.folder / "cache.json").stat().st_mtime_ns == stamp
    AcceleratorState._reset_state(True)
    _, _, other_length = _cached(tmp_path, "none", "float32", "model.text_encoder.max_length=12")
    AcceleratorState._reset_state(True)
    torch.manual_seed(1)  # other weights
    _, _, other_weights = _cached(tmp_path)
    AcceleratorState._reset_state(True)
    _, _, other_size = _cached(tmp_path, "none", "float32", "model.image_encoder.image_size=48")
    folders = {first.folder, other_length.folder, other_weights.folder, other_size.folder}
    assert len(folders) == 4
    key = json.loads((other_size.folder / "cache.json").read_text())
    assert key["towers"]["image"]["image_size"] == 48 and key["split"] == "validation"


def test_frozen_run_with_and_without_cache_reach_the_same_metrics(tmp_path):
    common = [
        *SMALL_DATA,
        "model.fusion.name=dense",
        "train.max_steps=6",
        "train.eval_every=6",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    live = train(tiny_config(*common, f"train.output_dir={tmp_path / 'live'}"))
    AcceleratorState._reset_state(True)
    cached = train(
        tiny_config(*common, "train.cache_features=true", f"train.output_dir={tmp_path / 'cached'}")
    )
    for key in ("acc@0.5", "acc@0.75", "miou"):
        assert cached["validation"][key] == pytest.approx(live["validation"][key], abs=1e-4)
    assert json.loads((tmp_path / "cached" / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.cache_features=true", "data.hflip_prob=0.5"], "random flips"),
        (["train.cache_features=true", "model.trainable_encoders=all"], "needs a frozen encoder"),
    ],
)
def test_refused_combinations(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_config(*overrides)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_compute_the_cache_once(tmp_path):
    from conftest import TINY_MODEL

    cache = tmp_path / "cache"
    result = launch(
        "grounding.py",
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        "train.cache_features=true",
        "model.trainable_encoders=none",
        f"train.cache_dir={cache}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        processes=2,
    )
    assert result.stdout.count("feature cache written") == 2  # train + validation, by the main process only
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["train", "validation"]  # no leftovers
    assert np.load(next(cache.glob("train-*")) / "valid.npy").all()


VQA = [
    "model.task=classification",
    "model.fusion.name=dense",
    "data.columns={image: image, question: question, answer: answer}",
]


def test_classification_cached_features_and_labels_equal_live_ones(tmp_path):
    cfg = tiny_config(*SMALL_DATA, *VQA, "model.trainable_encoders=none")
    cfg.model.answers = ["yes", "no", "2", "red"]
    model = VLFuseModel(cfg.model).eval()
    task = get_task("classification")
    live = task.build_dataset(cfg, model, "validation", train=False)
    cached = cached_dataset(
        model, live, "validation", tmp_path / "cache", "float32", 4, Accelerator(cpu=True)
    )
    key = json.loads((cached.folder / "cache.json").read_text())
    assert key["answers"] == ["yes", "no", "2", "red"]  # the vocabulary decides the labels: in the key
    for i in (0, 5, len(live) - 1):
        ex, cex = live[i], cached[i]
        assert (
            cex.pixel_values is None
            and torch.equal(ex.scores, cex.scores)
            and torch.equal(ex.target, cex.target)
        )
        with torch.no_grad():
            image = model.image_encoder(ex.pixel_values[None], with_pooled=False)
        torch.testing.assert_close(cex.features["image_tokens"], image.tokens[0], atol=1e-5, rtol=1e-5)
    AcceleratorState._reset_state(True)
    cfg.model.answers = ["yes", "no"]  # another vocabulary: another cache folder
    other = task.build_dataset(cfg, VLFuseModel(cfg.model), "validation", train=False)
    torch.manual_seed(0)
    assert (
        cached_dataset(
            VLFuseModel(cfg.model),
            other,
            "validation",
            tmp_path / "cache",
            "float32",
            4,
            Accelerator(cpu=True),
        ).folder
        != cached.folder
    )


def test_classification_run_with_and_without_cache_reach_the_same_metrics(tmp_path):
    common = [
        *SMALL_DATA,
        *VQA,
        "model.trainable_encoders=none",
        "train.max_steps=4",
        "train.eval_every=4",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    live = train(tiny_config(*common, f"train.output_dir={tmp_path / 'live'}"))["validation"]
    AcceleratorState._reset_state(True)
    cached = train(
        tiny_config(*common, "train.cache_features=true", f"train.output_dir={tmp_path / 'cached'}")
    )
    assert cached["validation"]["count"] == live["count"]
    for key in ("accuracy", "majority_baseline"):
        assert cached["validation"][key] == pytest.approx(live[key], abs=1e-4)
