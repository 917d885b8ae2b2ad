"""Image-text matching: loss and metrics on hand-made values, in-batch negatives, evaluation pairs,
predict after save/load, and the recipe through accelerate launch (resume, 1 and 2 processes)."""

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL, tiny_config
from PIL import Image
from test_recipes import SMALL_DATA, launch, read_metrics

from vlfuse.checkpointing import list_checkpoints
from vlfuse.data.loading import load_split
from vlfuse.model import VLFuseModel
from vlfuse.tasks.matching import (
    MatchingCollator,
    MatchingExample,
    MatchingTask,
    matching_metrics,
    roc_auc,
)
from vlfuse.training import evaluate, train

ITM = ["model.task=matching", "model.fusion.name=concat", "data.columns={image: image, text: captions}"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_loss_is_cross_entropy_over_the_pairs():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0, 1])
    loss, parts = MatchingTask().loss({"logits": logits}, {"labels": labels})
    # by hand: -log softmax of the labelled class, averaged
    by_hand = (
        -torch.log(torch.exp(torch.tensor(2.0)) / (1 + torch.exp(torch.tensor(2.0))))
        - torch.log(
            torch.exp(torch.tensor(1.0)) / (torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(-1.0)))
        )
        - torch.log(torch.tensor(0.5))
    ) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_roc_auc_on_hand_made_scores():
    # positives 0.9 and 0.7 against negatives 0.8, 0.6, 0.5: 0.9 beats all three, 0.7 beats two -> 5/6
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 0, 1, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert roc_auc(torch.tensor([0.7, 0.4, 0.4]), torch.tensor([1, 1, 0])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.3, 0.3, 0.3, 0.3]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1])) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0])) == 0.0
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])) != roc_auc(
        torch.tensor([0.1, 0.2]), torch.tensor([1, 1])
    )  # NaN without negatives


def test_roc_auc_equals_counting_every_positive_negative_pair():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = torch.tensor([round(rng.random(), 1) for _ in range(n)])  # rounded: many ties
        labels = torch.tensor([rng.randint(0, 1) for _ in range(n)])
        pos, neg = scores[labels == 1].tolist(), scores[labels == 0].tolist()
        if not pos or not neg:
            continue
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
        assert roc_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))


def test_accuracy_at_one_half():
    probabilities = torch.tensor([0.9, 0.5, 0.49, 0.1])
    labels = torch.tensor([1, 1, 1, 0])
    metrics = matching_metrics(probabilities, labels)
    assert metrics["accuracy"] == pytest.approx(3 / 4) and metrics["pairs"] == 4
    assert metrics["roc_auc"] == pytest.approx(1.0)


def _example(text, image_id, value=0.0):
    return MatchingExample(torch.full((3, 8, 8), value), text, torch.tensor(image_id))


def test_training_negatives_come_from_other_images_and_differ_in_text():
    def tokenize(texts):
        return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long)}

    collate = MatchingCollator(tokenize)
    examples = [
        _example("a red circle", 0),
        _example("the circle is left of the square", 0),  # the same image: never a negative for it
        _example("a red circle", 1),  # the same text as example 0: never its negative
        _example("two blue squares", 2),
        _example("a green triangle", 3),
    ]
    batch = collate(examples)
    n = len(examples)
    assert batch["labels"][:n].tolist() == [1] * n and batch["labels"][n:].tolist() == [0] * n
    assert batch["image_index"][:n].tolist() == batch["text_index"][:n].tolist() == list(range(n))
    texts = [e.text for e in examples]
    for i, j in zip(batch["image_index"][n:].tolist(), batch["text_index"][n:].tolist(), strict=True):
        assert examples[i].image_id != examples[j].image_id and texts[i] != texts[j]
    again = collate(examples)
    assert torch.equal(again["text_index"], batch["text_index"])  # keyed by the batch, not the global RNG
    # a batch of one image only has no negatives to draw
    alone = collate([_example("a", 5), _example("b", 5)])
    assert alone["labels"].tolist() == [1, 1]


def test_evaluation_pairs_are_fixed_and_scored_like_predict(tmp_path):
    cfg = tiny_config(*ITM, *SMALL_DATA)
    model = VLFuseModel(cfg.model).eval()
    task = MatchingTask()
    dataset = task.build_dataset(cfg, model, "validation", train=False)
    assert len(dataset) == 33 and dataset.counts["images"] == 11  # three captions per image
    again = task.build_dataset(cfg, model, "validation", train=False)
    assert dataset.negatives == again.negatives
    for i in range(len(dataset)):
        j = dataset.texts.index(dataset.negatives[i])
        assert dataset.image_ids[j] != dataset.image_ids[i] and dataset.negatives[i] != dataset.texts[i]
    collate = task.collator(model, train=False)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = collate(examples)
    assert batch["input_ids"].shape[0] == 2 * len(examples) and batch["labels"].shape == (33, 2)
    with torch.no_grad():
        got = task.metrics(task.eval_values(model(**batch), batch))
    # by hand through the public API: each caption with its image, then the negative with the same image
    rows = load_split(cfg.data, "validation")
    row_images = [rows[row]["image"] for row, _ in dataset.index]
    positive = model.predict(row_images, dataset.texts)
    negative = model.predict(row_images, dataset.negatives)
    by_hand = matching_metrics(torch.cat([positive, negative]), torch.tensor([1] * 33 + [0] * 33))
    assert got["pairs"] == 66
    assert got["roc_auc"] == pytest.approx(by_hand["roc_auc"], abs=1e-6)
    assert got["accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-6)


def test_predict_after_save_and_load(tmp_path):
    cfg = tiny_config(*ITM)
    model = VLFuseModel(cfg.model)
    images = [Image.new("RGB", (60, 40), (200, 0, 0)), Image.new("RGB", (30, 50))]
    probabilities = model.predict(images, ["a red circle", "two squares"])
    assert probabilities.shape == (2,) and ((probabilities >= 0) & (probabilities <= 1)).all()
    model.save_pretrained(tmp_path / "saved")
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.task == "itm"
    assert torch.equal(loaded.predict(images, ["a red circle", "two squares"]), probabilities)
    assert loaded.predict(images[0], ["a", "b", "c"]).shape == (3,)  # one image for every text
    with pytest.raises(ValueError, match="needs images and texts"):
        loaded.predict(images)


def test_in_process_training_learns_and_evaluates(tmp_path):
    """A few steps in process, for both trainable_encoders ends, through the shared loop."""
    for mode in ("none", "all"):
        AcceleratorState._reset_state(True)
        out = tmp_path / mode
        metrics = train(
            tiny_config(
                *ITM,
                *SMALL_DATA,
                f"model.trainable_encoders={mode}",
                "train.max_steps=3",
                f"train.output_dir={out}",
            )
        )["validation"]
        assert metrics["pairs"] == 66 and 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["roc_auc"] <= 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["trainable_encoders"] == mode
        assert (summary["frozen_parameters"] > 0) == (mode == "none")


@pytest.mark.slow
def test_itm_recipe_through_accelerate_launch_with_resume(tmp_path):
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        "model.trainable_encoders=all",
        f"train.output_dir={out}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    ]
    result = launch("itm.py", *common, "train.max_steps=4")
    assert "validation: accuracy=" in result.stdout and "chance 0.5 for both" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4] and all(r["pairs"] == 66 for r in records)
    resumed = launch("itm.py", *common, "train.max_steps=6", "train.resume_from=latest")
    assert "at step 4" in resumed.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4, 6]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_4", "step_6"]
    model = VLFuseModel.from_pretrained(out / "final")
    assert model.config.task == "itm" and model.trainable_encoders == "all"
    probabilities = model.predict([Image.new("RGB", (64, 64))] * 2, ["a red circle", "a blue square"])
    assert probabilities.shape == (2,)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_itm_metrics_are_the_same_on_one_and_two_processes(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_MODEL, *SMALL_DATA, "model.fusion.name=dense", "model.trainable_encoders=none"]
    launch("itm.py", *args, f"train.output_dir={out}", "train.max_steps=3", processes=2)
    on_two = read_metrics(out / "metrics.jsonl")[-1]
    assert on_two["pairs"] == 66  # 33 captions, each with its image and with another image's caption
    model = VLFuseModel.from_pretrained(out / "final")
    assert model.trainable_encoders == "none"
    cfg = tiny_config(*ITM, *SMALL_DATA, f"model.init_from={out / 'final'}")
    task = MatchingTask()
    dataset = task.build_dataset(cfg, model, "validation", train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=task.collator(model, train=False))
    on_one = evaluate(Accelerator(cpu=True), model, task, loader)
    for key in ("accuracy", "roc_auc", "pairs"):
        assert on_one[key] == pytest.approx(on_two[key], abs=1e-6), key


def test_logits_shape_matches_pairs():
    cfg = tiny_config(*ITM)
    model = VLFuseModel(cfg.model).eval()
    tokens = model.text_encoder.tokenize(["a", "b", "c"])
    with torch.no_grad():
        out = model(
            pixel_values=torch.randn(2, 3, 64, 64),
            **tokens,
            image_index=torch.tensor([0, 1, 0, 1]),
            text_index=torch.tensor([0, 1, 2, 2]),
        )
    assert out["logits"].shape == (4, 2)
    assert torch.allclose(F.softmax(out["logits"], dim=-1).sum(-1), torch.ones(4))
