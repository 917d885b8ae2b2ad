"""Several datasets mixed by weight (``data.datasets``): the epoch's shares, weight 0, layouts read each
by its own settings, evaluation per source and overall, resume, two processes, bad rows per source,
streaming, and every task."""

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState
from conftest import tiny_config
from helpers import write_jxu124_layout, write_lmms_layout
from huggingface_hub import ModelCard
from test_reliability import _losses, train_until_crash_after_checkpoint

from vlfuse.config import load_config
from vlfuse.data.mixing import MixedCollator, MixedDataset, MixedStream, mix_counts
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.tasks import get_task
from vlfuse.training import train
from vlfuse.training.data import build_split, build_stream_data, build_train_data, make_loader


class Numbers:
    """A stand-in task dataset: example i of source ``tag`` is ``(tag, i)``; optionally refuses reads."""

    def __init__(self, tag: str, n: int, refuse: bool = False) -> None:
        self.tag, self.n, self.refuse, self.epoch = tag, n, refuse, 0
        self.counts = Counter(rows=n)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.refuse:
            raise AssertionError(f"source {self.tag} was read")
        return (self.tag, i)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def describe(self):
        return f"{self.n} examples"


def test_an_epochs_counts_follow_the_weights_and_the_stopping_rule():
    assert mix_counts([100, 100], [3, 1], "first_exhausted") == [100, 33]  # a stops it: no repeats
    assert mix_counts([100, 100], [3, 1], "all_exhausted") == [300, 100]  # b read whole: a repeats
    assert mix_counts([10, 1000], [1, 1], "first_exhausted") == [10, 10]
    assert mix_counts([10, 50, 7], [1, 0, 1], "all_exhausted") == [10, 0, 10]  # weight 0: none


def test_over_n_draws_each_source_takes_its_weights_share_and_weight_zero_is_never_read():
    dataset = MixedDataset(
        [("a", Numbers("a", 3000)), ("b", Numbers("b", 3000)), ("z", Numbers("z", 50, refuse=True))],
        [0.7, 0.3, 0.0],
        "first_exhausted",
        seed=0,
    )
    cfg = tiny_config("data.num_workers=0")
    loader = make_loader(dataset, cfg, lambda batch: batch, batch_size=50, shuffle=True)
    loader = prepare_data_loader(loader, put_on_device=False, use_seedable_sampler=True)  # as a run's
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)  # as MapData does
        dataset.set_epoch(epoch)
        epochs.append([item for batch in loader for item in batch])
    seen = epochs[0] + epochs[1]
    n = 800  # the first N draws of the shuffled epoch
    shares = Counter(tag for tag, _ in seen[:n])
    for tag, weight in (("a", 0.7), ("b", 0.3)):
        tolerance = 4 * math.sqrt(weight * (1 - weight) / n)  # 4 binomial standard deviations
        assert abs(shares[tag] / n - weight) < tolerance, (tag, shares)
    assert "z" not in {tag for tag, _ in seen}
    assert len(dataset) == 3000 + 1286  # a used up (3000 = 70%), b's 30% of the epoch
    first = epochs[0]
    assert len(set(first)) == len(first) == 4250  # no example twice; whole batches of 50
    assert set(epochs[1]) != set(first)  # another part of b in the next epoch


def test_entries_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"unknown key 'data.datasets\[1\].colums'"):
        load_config(overrides=["data.datasets=[{dataset: a}, {dataset: b, colums: {image: i}}]"])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].weight"):
        load_config(overrides=["data.datasets=[{dataset: a, weight: -1}]"])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].box_format"):
        load_config(overrides=["data.datasets=[{dataset: a, box_format: xxyy}]"])
    with pytest.raises(ConfigError, match="two 'data.datasets' entries are named 'refcoco'"):
        load_config(overrides=["data.datasets=[{dataset: x/refcoco}, {dataset: y/refcoco}]"])
    with pytest.raises(ConfigError, match="every 'data.datasets' entry has weight 0"):
        load_config(overrides=["data.datasets=[{dataset: a, weight: 0}]"])
    with pytest.raises(ConfigError, match="data.mix_stopping"):
        load_config(overrides=["data.mix_stopping=longest"])


@pytest.fixture()
def layouts(tmp_path):
    """The jxu124 layout (image paths under a root, xyxy boxes, a captions list) and the lmms layout
    (embedded images, xywh boxes, expressions in ``answer``, no train split)."""
    jxu, image_root = write_jxu124_layout(tmp_path / "j", rows_per_split=20)
    lmms = write_lmms_layout(tmp_path / "l", rows_per_split=16)
    entries = (
        f"{{dataset: {jxu}, image_root: {image_root}, box_format: xyxy, "
        "columns: {image: image_path, text: captions, box: bbox}}, "
        f"{{dataset: {lmms}, name: lmms, train_split: val, eval_split: test, weight: 1, "
        "columns: {image: image, text: answer, box: bbox}, box_format: xywh}"
    )
    return {"jxu": jxu, "image_root": image_root, "lmms": lmms, "datasets": f"data.datasets=[{entries}]"}


GROUNDING = ["model.fusion.name=dense", "train.batch_size=8", "train.log_every=1"]


def test_grounding_from_two_layouts_reads_each_with_its_own_settings(layouts):
    cfg = tiny_config(*GROUNDING, layouts["datasets"])
    task, model = get_task("grounding"), VLFuseModel(cfg.model)
    from accelerate import Accelerator

    data = build_train_data(Accelerator(cpu=True), cfg, task, model)
    mixed = data.dataset
    assert isinstance(mixed, MixedDataset) and mixed.names == ["refcoco", "lmms"]
    # Every mixed example is exactly its source's own example (boxes read as xyxy vs xywh).
    alone = {
        "refcoco": build_split(
            Accelerator(cpu=True),
            tiny_config(
                f"data.dataset={layouts['jxu']}",
                f"data.image_root={layouts['image_root']}",
                "data.columns={image: image_path, text: captions, box: bbox}",
            ),
            task,
            model,
            "train",
            True,
        ),
        "lmms": build_split(
            Accelerator(cpu=True),
            tiny_config(
                f"data.dataset={layouts['lmms']}",
                "data.columns={image: image, text: answer, box: bbox}",
                "data.box_format=xywh",
            ),
            task,
            model,
            "val",
            True,
        ),
    }
    for j in range(len(mixed)):
        k, i = mixed.source_of(j)
        got, want = mixed[j], alone[mixed.names[k]][i]
        assert torch.equal(got.box, want.box) and got.text == want.text
        assert torch.equal(got.pixel_values, want.pixel_values)
    assert {mixed.source_of(j)[0] for j in range(len(mixed))} == {0, 1}


def test_a_mixed_run_reports_every_source_and_all_together(layouts, tmp_path):
    out = tmp_path / "run"
    # A third source of weight 0 names a train split that does not exist: training never reads it, and
    # its evaluation split is still evaluated.
    watched = (
        f", {{dataset: {layouts['lmms']}, name: watched, weight: 0, train_split: nowhere, eval_split: testA, "
        "columns: {image: image, text: answer, box: bbox}, box_format: xywh}]"
    )
    datasets = layouts["datasets"][:-1] + watched
    metrics = train(tiny_config(*GROUNDING, datasets, "train.max_steps=3", f"train.output_dir={out}"))
    assert set(metrics) == {"validation", "validation[refcoco]", "validation[lmms]", "validation[watched]"}
    assert metrics["validation[watched]"]["count"] == 32  # testA: 16 rows x 2 expressions
    counts = {split: m["count"] for split, m in metrics.items()}
    assert counts["validation"] == counts["validation[refcoco]"] + counts["validation[lmms]"] + 32
    # the overall figure is the examples' mean over both sources, not a mean of the two means
    overall = metrics["validation"]["miou"] * counts["validation"]
    parts = sum(m["miou"] * counts[s] for s, m in metrics.items() if s != "validation")
    assert overall == pytest.approx(parts, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_rows[refcoco]"] == summary["bad_rows[lmms]"] == 0
    assert "bad_rows[watched]" not in summary  # not a training source
    # The model card lists both sources, and each source's results under its own split.
    card = ModelCard.load(out / "final" / "README.md")
    assert "| refcoco | 1.0 |" in card.text and "| lmms | 1 |" in card.text
    where = {(r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert (str(layouts["lmms"]), "test") in where and (str(layouts["jxu"]), "validation") in where
    assert (f"{layouts['jxu']} + {layouts['lmms']} + {layouts['lmms']}", "validation") in where


def test_bad_rows_are_counted_per_source(layouts, tmp_path):
    for image in sorted((Path(layouts["image_root"]) / "coco" / "train2014").glob("*.jpg"))[:3]:
        image.unlink()  # three train images of the jxu source are gone (bad rows, not a config error)
    out = tmp_path / "run"
    train(
        tiny_config(
            *GROUNDING,
            layouts["datasets"],
            "data.max_bad_fraction=0.5",
            "train.max_steps=8",
            f"train.output_dir={out}",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_rows[refcoco]"] > 0 and summary["bad_rows[lmms]"] == 0
    assert summary["bad_rows"] == summary["bad_rows[refcoco]"]


def test_two_processes_see_disjoint_examples():
    cfg = tiny_config()
    dataset = MixedDataset([("a", Numbers("a", 40)), ("b", Numbers("b", 30))], [1, 1], "first_exhausted", 0)
    seen = []
    for rank in (0, 1):
        loader = make_loader(dataset, cfg, MixedCollator(lambda batch: {"items": batch}, 2), 4, shuffle=True)
        loader = prepare_data_loader(
            loader, num_processes=2, process_index=rank, put_on_device=False, use_seedable_sampler=True
        )
        seen.append([item for batch in loader for item in batch["items"]])
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    # 30 of each source: 7 whole steps of 4 examples per process (the last 4 examples dropped)
    assert len(seen[0]) == len(seen[1]) == 28


RESUMED = ["train.max_steps=6", "train.checkpoint_every=3", "model.fusion.dropout=0.2", "data.hflip_prob=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_resume_mid_epoch_continues_the_same_mixed_order(layouts, tmp_path, monkeypatch, streaming):
    common = [
        *GROUNDING,
        *RESUMED,
        layouts["datasets"],
        f"data.streaming={str(streaming).lower()}",
        "data.shuffle_buffer=8",
    ]
    train(tiny_config(*common, f"train.output_dir={tmp_path / 'straight'}"))
    AcceleratorState._reset_state(True)
    train_until_crash_after_checkpoint(
        monkeypatch, tiny_config(*common, f"train.output_dir={tmp_path / 'resumed'}"), step=3
    )
    AcceleratorState._reset_state(True)
    train(tiny_config(*common, f"train.output_dir={tmp_path / 'resumed'}", "train.resume_from=latest"))
    a, b = (
        _losses(tmp_path / "straight" / "train_log.jsonl"),
        _losses(tmp_path / "resumed" / "train_log.jsonl"),
    )
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and a == b


def test_streamed_sources_mix_by_weight_on_disjoint_processes(layouts):
    cfg = tiny_config(
        *GROUNDING,
        layouts["datasets"].replace("weight: 1,", "weight: 3,"),
        "data.streaming=true",
        "train.max_steps=5",
    )
    task = get_task("grounding")
    model = VLFuseModel(cfg.model)
    seen = []
    for rank in (0, 1):
        stream = build_stream_data(cfg, task, model, rank, 2)
        assert isinstance(stream, MixedStream)
        seen.append(
            [
                (stream.names[0] if e.text in _texts(layouts, "jxu") else "lmms", tuple(e.box.tolist()))
                for e in stream
            ]
        )
    assert not set(seen[0]) & set(seen[1])
    both = seen[0] + seen[1]
    # lmms (weight 3) is drawn about three times as often as refcoco (weight 1) until it runs out
    # (first_exhausted ends the pass there)
    sources = Counter(name for name, _ in both)
    assert sources["lmms"] > 1.5 * sources["refcoco"]


def _texts(layouts, which):
    return {"the red box", "red rectangle"} if which == "jxu" else {"red box", "the red one"}


FROZEN_CACHED_CHUNKED = [
    "model.trainable_encoders=none",
    "train.cache_features=true",
    "train.contrastive_chunk_size=3",
]


@pytest.mark.parametrize(
    "config, extra",
    [("grounding", []), ("retrieval", []), ("retrieval", FROZEN_CACHED_CHUNKED), ("vqa", []), ("itm", [])],
    ids=["grounding", "retrieval", "retrieval-cached-chunked", "vqa", "itm"],
)
def test_every_task_trains_on_a_mixed_train_split(config, extra, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "configs" / config / "shapes.yaml"
    out = tmp_path / "run"
    cfg = load_config(
        recipe,
        [
            "data.datasets=[{dataset: shapes, name: a, max_train_samples: 24}, "
            "{dataset: shapes, name: b, weight: 2, max_train_samples: 40, max_eval_samples: 6}]",
            "data.shapes_train_size=64",
            "data.shapes_eval_size=10",
            "model.text_encoder.max_length=16",
            "train.batch_size=8",
            "train.max_steps=2",
            "train.eval_every=2",
            "train.log_every=1",
            f"train.output_dir={out}",
            f"train.cache_dir={tmp_path / 'cache'}",
            *extra,
        ],
    )
    metrics = train(cfg)
    assert set(metrics) == {"validation", "validation[a]", "validation[b]"}
    if config == "retrieval":  # images of the two sources are distinct images overall
        assert metrics["validation"]["images"] == metrics["validation[a]"]["images"] + 6 == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "bad_rows[a]" in summary


def test_two_sources_image_zero_are_two_images():
    # Retrieval's positives are examples of one image id: a mix must keep ids apart across sources and
    # equal within one.
    @dataclasses.dataclass
    class Caption:
        tag: str
        image_id: torch.Tensor

    class Captions(Numbers):
        def __getitem__(self, i):
            return Caption(self.tag, torch.tensor(i // 3))  # three captions per image

    dataset = MixedDataset([("a", Captions("a", 9)), ("b", Captions("b", 9))], [1, 1], "first_exhausted", 0)
    ids = {"a": set(), "b": set()}
    for j in range(len(dataset)):
        example = dataset[j]
        ids[example.tag].add(int(example.image_id))
    assert len(ids["a"]) == len(ids["b"]) == 3 and not ids["a"] & ids["b"]
