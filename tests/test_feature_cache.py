import json
import re

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_config
from test_recipes import SMALL_DATA, launch

from vlfuse.data.feature_cache import cached_dataset
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.tasks import get_task
from vlfuse.tasks.grounding import GroundingTask
from vlfuse.training import train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _cached(tmp_path, mode="none", dtype="float32", *extra, fusion="concat"):
    cfg = tiny_config(*SMALL_DATA, f"model.fusion.name={fusion}", f"model.trainable_encoders={mode}", *extra)
    model = VLFuseModel(cfg.model)
    live = GroundingTask().build_dataset(cfg, model, "validation", train=False)
    cached = cached_dataset(model, live, "validation", tmp_path / "cache", dtype, 8, Accelerator(cpu=True))
    return model, live, cached


# What each fusion reads, hence what is cached: pooled vectors only (concat), or token features (dense).
STORED = {
    "concat": {"image_pooled", "text_pooled"},
    "dense": {"image_tokens", "text_tokens", "text_mask", "text_pooled"},
}


@pytest.mark.parametrize("fusion", ["concat", "dense"])
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float16", 2e-2)])
def test_cached_features_equal_live_ones(tmp_path, dtype, tol, fusion):
    model, live, cached = _cached(tmp_path, "none", dtype, fusion=fusion)
    model.eval()
    for i in (0, 3, len(live) - 1):
        ex, cex = live[i], cached[i]
        assert cex.pixel_values is None and torch.equal(ex.box, cex.box) and torch.equal(ex.meta, cex.meta)
        assert set(cex.features) == STORED[fusion]
        with torch.no_grad():
            image = model.image_encoder(ex.pixel_values[None])
            tokens = model.text_encoder.tokenize([ex.text])
            text = model.text_encoder(**tokens)
        if fusion == "dense":
            torch.testing.assert_close(cex.features["image_tokens"], image.tokens[0], atol=tol, rtol=tol)
            n = int(tokens["attention_mask"].sum())
            assert cex.features["text_mask"][:n].all() and not cex.features["text_mask"][n:].any()
            torch.testing.assert_close(
                cex.features["text_tokens"][:n], text.tokens[0, :n], atol=tol, rtol=tol
            )
        else:
            torch.testing.assert_close(cex.features["image_pooled"], image.pooled[0], atol=tol, rtol=tol)
        torch.testing.assert_close(cex.features["text_pooled"], text.pooled[0], atol=tol, rtol=tol)


def test_only_the_frozen_tower_is_cached(tmp_path):
    _, _, image_frozen = _cached(tmp_path, "text")
    assert set(image_frozen.folders) == {"image"}
    assert {"image_pooled", "image_row"} <= image_frozen.arrays.keys()
    assert "text_pooled" not in image_frozen.arrays
    assert image_frozen[0].pixel_values is None and "input_ids" not in image_frozen[0].features
    AcceleratorState._reset_state(True)
    _, _, text_frozen = _cached(tmp_path, "image")
    assert set(text_frozen.folders) == {"text"}
    assert "text_pooled" in text_frozen.arrays and "image_pooled" not in text_frozen.arrays
    assert text_frozen[0].pixel_values is not None


def _stamp(folder):
    return (folder / "cache.json").stat().st_mtime_ns


def test_key_changes_recompute_and_same_key_reuses(tmp_path):
    _, _, first = _cached(tmp_path)
    stamps = {tower: _stamp(folder) for tower, folder in first.folders.items()}
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)  # the same random init: the same weights
    _, _, again = _cached(tmp_path)
    assert again.folders == first.folders
    assert {tower: _stamp(folder) for tower, folder in again.folders.items()} == stamps
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    # Each tower has its own key: a text setting changes the text folder only, an image one the image's.
    _, _, other_length = _cached(tmp_path, "none", "float32", "model.text_encoder.max_length=12")
    assert other_length.folders["image"] == first.folders["image"]
    assert other_length.folders["text"] != first.folders["text"]
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    _, _, other_size = _cached(tmp_path, "none", "float32", "model.image_encoder.image_size=48")
    assert other_size.folders["text"] == first.folders["text"]
    assert other_size.folders["image"] != first.folders["image"]
    key = json.loads((other_size.folders["image"] / "cache.json").read_text())
    assert key["encoder"]["image_size"] == 48 and key["split"] == "validation" and key["tower"] == "image"
    # Settings that change what the same weights compute: the timm kwargs, the text config overrides.
    for override, tower in [
        ("model.image_encoder.kwargs.output_stride=16", "image"),
        ("model.text_encoder.config_overrides.hidden_act=relu", "text"),
    ]:
        AcceleratorState._reset_state(True)
        torch.manual_seed(0)
        _, _, other = _cached(tmp_path, "none", "float32", override)
        other_tower = {"image": "text", "text": "image"}[tower]
        assert other.folders[tower] != first.folders[tower], override
        assert other.folders[other_tower] == first.folders[other_tower], override
    AcceleratorState._reset_state(True)
    torch.manual_seed(1)  # other weights: both towers
    _, _, other_weights = _cached(tmp_path)
    assert not set(other_weights.folders.values()) & set(first.folders.values())
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)  # another fusion reads token features: other folders
    _, _, tokens = _cached(tmp_path, fusion="dense")
    assert not set(tokens.folders.values()) & set(first.folders.values())


def test_a_tower_cached_by_one_mode_is_reused_by_the_others(tmp_path, capsys):
    # compare's modes: none computes both towers; text and image then reuse the tower they freeze.
    common = [
        *SMALL_DATA,
        "model.fusion.name=dense",
        "train.max_steps=2",
        "train.cache_features=true",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    written = {}
    for mode in ("none", "text", "image"):
        train(tiny_config(*common, f"model.trainable_encoders={mode}", f"train.output_dir={tmp_path / mode}"))
        AcceleratorState._reset_state(True)
        out = capsys.readouterr().out
        written[mode] = sorted(set(re.findall(r"feature cache (written|reused) \((\w+) tower\)", out)))
    assert written["none"] == [("written", "image"), ("written", "text")]
    assert written["text"] == [("reused", "image")]  # the text tower trains: only the image is cached
    assert written["image"] == [("reused", "text")]
    assert len(list((tmp_path / "cache").iterdir())) == 4  # train + validation, image + text: once each


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
    # train + validation, image + text, by the main process only
    assert result.stdout.count("feature cache written") == 4
    names = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert names == ["train-image", "train-text", "validation-image", "validation-text"]  # no leftovers
    assert np.load(next(cache.glob("train-image-*")) / "valid.npy").all()


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
    key = json.loads((cached.folders["image"] / "cache.json").read_text())
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
        ).folders["image"]
        != cached.folders["image"]
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


RETRIEVAL = ["model.task=retrieval", "model.fusion.name=projection", "data.columns.text=alt_text"]


def test_retrieval_cached_evaluation_equals_live(tmp_path):
    from helpers import write_flickr_layout

    folder = write_flickr_layout(tmp_path)
    cfg = tiny_config(*RETRIEVAL, f"data.dataset={folder}", "model.trainable_encoders=none")
    model = VLFuseModel(cfg.model).eval()
    task = get_task("retrieval")
    live = task.build_dataset(cfg, model, "test", train=False)
    cached = task.over_examples(
        live,
        lambda base: cached_dataset(
            model, base, "test", tmp_path / "cache", "float32", 4, Accelerator(cpu=True)
        ),
    )
    assert set(cached.base.folders) == {"image", "text"}
    collate = task.collator(model, train=False)
    live_batch = collate([live[i] for i in range(len(live))])
    cached_batch = collate([cached[i] for i in range(len(cached))])
    # pooled vectors only (the projection fusion reads nothing else), captions flattened as live ones are
    assert "pixel_values" not in cached_batch and "input_ids" not in cached_batch
    assert cached_batch["image_pooled"].shape[0] == 8 and cached_batch["text_pooled"].shape[0] == 8 * 4
    assert torch.equal(cached_batch["text_valid"], live_batch["text_valid"])
    with torch.no_grad():
        a = task.metrics(task.eval_values(model(**live_batch), live_batch))
        b_out = model(**cached_batch)
        b = task.metrics(task.eval_values(b_out, cached_batch))
        live_out = model(**live_batch)
    torch.testing.assert_close(b_out["image_embeds"], live_out["image_embeds"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_out["text_embeds"], live_out["text_embeds"], atol=1e-5, rtol=1e-5)
    assert a == pytest.approx(b)


NO_TEXT_DROPOUT = (
    'model.text_encoder.config_overrides={"hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}'
)
TEXT_TOP = {
    "text_top": ["model.text_encoder.tuning=last_blocks", "model.text_encoder.last_blocks=1"],
    "text_top_lora": ["model.text_encoder.tuning=lora", "model.text_encoder.lora.last_blocks=1"],
}


@pytest.mark.parametrize("mode", ["none", "text", "text_top", "text_top_lora"])
def test_retrieval_run_with_and_without_cache_reach_the_same_metrics(tmp_path, capsys, mode):
    # none: only the projections learn; text: LiT (a locked, cached image tower, the text tower learns);
    # text_top(_lora): LiT with the text tower's last layer learning (or LoRA in it only), its frozen
    # layer's output cached
    from helpers import write_flickr_layout

    folder = write_flickr_layout(tmp_path)
    common = [
        *RETRIEVAL,
        f"data.dataset={folder}",
        f"model.trainable_encoders={mode.split('_')[0]}",
        *(TEXT_TOP[mode] + [NO_TEXT_DROPOUT] if mode in TEXT_TOP else []),
        "data.train_split=train",
        "data.eval_split=test",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.eval_every=4",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    live = train(tiny_config(*common, f"train.output_dir={tmp_path / 'live'}"))["test"]
    AcceleratorState._reset_state(True)
    cached = train(
        tiny_config(*common, "train.cache_features=true", f"train.output_dir={tmp_path / 'cached'}")
    )["test"]
    assert cached["images"] == live["images"] == 8 and cached["texts"] == live["texts"] == 32
    for key in ("i2t_r@1", "t2i_r@1", "mean_recall"):
        assert cached[key] == pytest.approx(live[key], abs=1e-4), key
    out = capsys.readouterr().out
    assert ("written (text tower's frozen prefix, entering encoder.layer.1)" in out) == (mode in TEXT_TOP)


def test_towers_served_by_the_cache_stay_off_the_accelerator():
    from vlfuse.training.report import accelerator_weights_mib
    from vlfuse.training.setup import towers_served_by_cache

    accelerator = Accelerator(cpu=True)
    decide = {
        (mode, cache): towers_served_by_cache(
            tiny_config(f"model.trainable_encoders={mode}", f"train.cache_features={cache}"), accelerator
        )
        for mode, cache in (("none", True), ("text", True), ("image", True), ("none", False))
    }
    assert decide == {
        ("none", True): ["image", "text"],
        ("text", True): ["image"],
        ("image", True): ["text"],
        ("none", False): [],
    }
    # The placement itself, checked on a device other than the CPU ("meta": no memory, no GPU needed).
    model = VLFuseModel(tiny_config("model.trainable_encoders=text").model).place(
        "meta", keep_on_cpu=["image"]
    )
    devices = {name.split(".")[0]: p.device.type for name, p in model.named_parameters()}
    assert devices == {"image_encoder": "cpu", "text_encoder": "meta", "fusion": "meta", "head": "meta"}
    on_meta = [*model.text_encoder.parameters(), *model.text_encoder.buffers(), *model.fusion.parameters()]
    on_meta += [*model.fusion.buffers(), *model.head.parameters(), *model.head.buffers()]
    expected_mib = sum(t.numel() * t.element_size() for t in on_meta) / 2**20
    assert accelerator_weights_mib(model, torch.device("meta")) == pytest.approx(expected_mib)
    ignored = model.tower_state_names(["image"])
    assert ignored and all(n.startswith("image_encoder.") for n in ignored)
    assert any(n.endswith("running_mean") for n in ignored)  # buffers too: DDP would broadcast them


def test_a_cached_tower_never_runs_and_the_saved_model_is_whole(tmp_path, monkeypatch, capsys):
    import vlfuse.training.setup as training

    common = [
        *SMALL_DATA,
        "model.fusion.name=dense",
        "model.trainable_encoders=none",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.cache_features=true",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    first = train(tiny_config(*common, f"train.output_dir={tmp_path / 'first'}"))  # computes the cache
    AcceleratorState._reset_state(True)
    real_build = training.build_model

    def refuse(*args, **kwargs):
        raise AssertionError("a tower served by the cache was called")

    def build_with_towers_that_refuse(cfg, check_task=True):
        model = real_build(cfg, check_task)
        monkeypatch.setattr(model.image_encoder, "forward", refuse)
        monkeypatch.setattr(model.text_encoder, "forward", refuse)
        return model

    monkeypatch.setattr(training, "build_model", build_with_towers_that_refuse)
    seen = {}

    def on_end(accelerator, model):
        seen.update({n.split(".")[0]: p.device.type for n, p in model.named_parameters()})

    again = train(tiny_config(*common, f"train.output_dir={tmp_path / 'again'}"), on_end=on_end)
    assert "left on the CPU, never run" in capsys.readouterr().out
    assert seen["image_encoder"] == seen["text_encoder"] == "cpu"
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["towers_served_by_cache"] == ["image", "text"]
    assert summary["accelerator_weights_mib"] is None  # a CPU run
    assert again["validation"]["acc@0.5"] == first["validation"]["acc@0.5"]
    assert again["validation"]["miou"] == pytest.approx(first["validation"]["miou"], abs=1e-6)
    # final/ holds both towers and predicts from raw inputs
    from PIL import Image

    saved = VLFuseModel.from_pretrained(tmp_path / "again" / "final")
    box = saved.predict([Image.new("RGB", (64, 48), (200, 30, 30))], ["the red square"])
    assert tuple(box.shape[-1:]) == (4,) and torch.isfinite(box).all()


# --------------------------------------------------------------------------- one entry per distinct input
def _repeated_image_split(root, copies: int = 4, images: int = 5):
    """A grounding split in Hub layout where every image is the row of ``copies`` expressions (RefCOCO
    keeps one object per row), plus one row whose image differs from the first by one pixel; two
    expressions repeat across images."""
    import datasets
    from PIL import Image, ImageDraw

    rows = {"image": [], "text": [], "box": []}
    for k in range(images):
        image = Image.new("RGB", (48, 40), (20 * k, 30, 60))
        ImageDraw.Draw(image).rectangle([5 + k, 6, 20 + k, 25], fill=(200, 40, 40))
        for c in range(copies):
            rows["image"].append(image)
            rows["text"].append(["the red box", "the left one", f"object {k}", f"thing {c} of {k}"][c])
            rows["box"].append([5.0 + k, 6.0, 21.0 + k, 26.0])
    changed = rows["image"][0].copy()
    changed.putpixel((0, 0), (255, 255, 255))
    rows["image"].append(changed)
    rows["text"].append("the red box")
    rows["box"].append([5.0, 6.0, 21.0, 26.0])
    folder = root / "repeated"
    (folder / "data").mkdir(parents=True)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "box": datasets.Sequence(datasets.Value("float32")),
        }
    )
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(folder / "data" / f"{split}-0.parquet")
        )
    return folder


def _counting_decodes(monkeypatch) -> list:
    """Patches the cache build's image decoding to record what it decodes (the same decoding runs)."""
    import vlfuse.data.cache_build as cache_build

    decoded, real = [], cache_build.load_image
    monkeypatch.setattr(cache_build, "load_image", lambda v, root: decoded.append(v) or real(v, root))
    return decoded


def test_each_distinct_input_is_one_entry_and_every_row_reads_its_own_features(tmp_path, monkeypatch):
    folder = _repeated_image_split(tmp_path)
    cfg = tiny_config(f"data.dataset={folder}", "model.fusion.name=dense", "model.trainable_encoders=none")
    model = VLFuseModel(cfg.model).eval()
    live = GroundingTask().build_dataset(cfg, model, "validation", train=False)
    assert len(live) == 21
    decoded = _counting_decodes(monkeypatch)
    cached = cached_dataset(
        model, live, "validation", tmp_path / "cache", "float32", 8, Accelerator(cpu=True)
    )
    assert len(decoded) == 6  # each distinct encoded image decoded once, not once per row
    for i in range(21):  # labels of rows whose image was not decoded again equal the live ones
        for name in ("box", "original_box", "meta"):
            torch.testing.assert_close(getattr(cached[i], name), getattr(live[i], name), atol=0, rtol=0)
    image_stats, text_stats = cached.cache_stats["image"], cached.cache_stats["text"]
    # 5 images x 4 rows, plus one image with one pixel changed: 6 entries for 21 examples
    assert (image_stats["entries"], image_stats["examples"]) == (6, 21)
    assert np.load(cached.folders["image"] / "image_tokens.npy", mmap_mode="r").shape[0] == 6
    # texts: "the red box" and "the left one" repeat across images; 3 distinct others per image
    assert text_stats["entries"] == len(set(live.texts)) == 2 + 5 * 2
    assert np.load(cached.folders["text"] / "text_tokens.npy", mmap_mode="r").shape[0] == 12
    assert image_stats["bytes"] > 0 and image_stats["build_time_s"] >= 0
    rows = np.load(cached.folders["image"] / "image_row.npy")
    assert rows[0] == rows[1] == rows[2] == rows[3] and rows[20] != rows[0]  # the changed pixel: its own
    for i in (0, 3, 7, 20):  # repeated and unique inputs alike equal the live towers
        ex, cex = live[i], cached[i]
        with torch.no_grad():
            image = model.image_encoder(ex.pixel_values[None])
            text = model.text_encoder(**model.text_encoder.tokenize([ex.text]))
        torch.testing.assert_close(cex.features["image_tokens"], image.tokens[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cex.features["text_pooled"], text.pooled[0], atol=1e-5, rtol=1e-5)


def test_the_run_reports_the_cache_entries_and_reads_the_same_metrics_as_without_it(tmp_path, capsys):
    folder = _repeated_image_split(tmp_path)
    common = [
        f"data.dataset={folder}",
        "model.fusion.name=concat",
        "model.trainable_encoders=none",
        "train.batch_size=8",
        "train.max_steps=3",
    ]
    live = train(tiny_config(*common, f"train.output_dir={tmp_path / 'live'}"))
    AcceleratorState._reset_state(True)
    cached = train(
        tiny_config(
            *common,
            "train.cache_features=true",
            f"train.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / 'cached'}",
        )
    )
    for k in ("acc@0.5", "miou"):
        assert cached["validation"][k] == pytest.approx(live["validation"][k], abs=1e-4)
    out = capsys.readouterr().out
    assert "(image tower)" in out and "6 distinct inputs for 21 examples" in out
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    entries = sorted((s["entries"], s["examples"]) for s in summary["feature_cache"].values())
    # image and text folders of both splits: 6 images and 12 texts for 21 examples each
    assert entries == [(6, 21), (6, 21), (12, 21), (12, 21)]


def test_rows_naming_the_same_image_file_decode_it_once(tmp_path, monkeypatch):
    """The image-path layout (a folder of files, rows naming them): a file named by several rows is read
    once, a copy of it under another name is read again but shares its entry (equal pixels)."""
    import datasets
    from PIL import Image

    (tmp_path / "images").mkdir()
    for k in range(3):
        Image.new("RGB", (40, 32), (60 * k, 90, 30)).save(tmp_path / "images" / f"{k}.png")
    Image.open(tmp_path / "images" / "0.png").save(tmp_path / "images" / "copy.png")
    names = ["0.png", "1.png", "0.png", "2.png", "1.png", "copy.png", "0.png"]
    rows = {"image": names, "text": [f"thing {i}" for i in range(7)], "box": [[2.0, 3.0, 20.0, 30.0]] * 7}
    folder = tmp_path / "paths"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / f"{split}-0.parquet"))
    cfg = tiny_config(
        f"data.dataset={folder}", f"data.image_root={tmp_path / 'images'}", "model.trainable_encoders=none"
    )
    model = VLFuseModel(cfg.model).eval()
    live = GroundingTask().build_dataset(cfg, model, "validation", train=False)
    decoded = _counting_decodes(monkeypatch)
    cached = cached_dataset(
        model, live, "validation", tmp_path / "cache", "float32", 4, Accelerator(cpu=True)
    )
    assert sorted(decoded) == ["0.png", "1.png", "2.png", "copy.png"]
    assert cached.cache_stats["image"]["entries"] == 3  # copy.png has 0.png's pixels
    rows = np.load(cached.folders["image"] / "image_row.npy")
    assert rows[0] == rows[2] == rows[5] == rows[6] and len(set(rows.tolist())) == 3
    for i in range(7):
        torch.testing.assert_close(cached[i].box, live[i].box, atol=0, rtol=0)
