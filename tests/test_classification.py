"""VQA-style classification: answer vocabulary, soft scores and accuracy on hand-made data, the dataset
on a local copy of the VQAv2 Hub layout, and predict on a saved model."""

import pytest
import torch
from conftest import tiny_config
from helpers import write_vqav2_layout

from vlfuse.data.answers import answer_scores, answers_of, build_vocabulary, normalize_answer
from vlfuse.data.loading import load_split
from vlfuse.model import VLFuseModel
from vlfuse.tasks.classification import ClassificationCollator, ClassificationTask

VQA = ["model.task=classification", "model.fusion.name=dense"]


def test_answers_are_read_and_normalized_from_every_layout():
    # the official normalization ("!" is not among its punctuation marks; number words become digits)
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("Two  Dogs!") == "2 dogs!"
    # answers are kept as written (cleaned); normalization happens where they are compared
    assert answers_of("Red") == ["Red"]
    assert answers_of(["red", " ", "Blue\n"]) == ["red", "Blue"]
    assert answers_of([{"answer": "2", "answer_id": 1}, {"answer": "Two"}]) == ["2", "Two"]
    assert answers_of(None) == [] and answers_of(3) == []


def test_vocabulary_keeps_the_top_k_and_counts_the_rest():
    cells = [
        "yes",
        "yes",
        "no",
        ["yes", "no", "no", "maybe"],
        [{"answer": "red"}],
        "blue",
        None,
        "",
    ]
    vocab, stats = build_vocabulary(cells, size=2)
    # counts: yes 3, no 3, maybe 1, red 1, blue 1 -> ties broken alphabetically
    assert vocab == ["no", "yes"]
    assert stats["questions"] == 8
    assert stats["questions_without_answer"] == 2
    assert stats["questions_unknown"] == 2  # "red" and "blue" questions
    assert stats["answers_total"] == 9 and stats["answers_distinct"] == 5
    vocab3, _ = build_vocabulary(cells, size=3)
    assert vocab3 == ["no", "yes", "blue"]


def test_soft_scores_and_targets():
    index = {"yes": 0, "no": 1, "2": 2}
    # ten annotators: yes x2, no x7, "maybe" x1 (not in the vocabulary)
    scores, target = answer_scores(["yes"] * 2 + ["no"] * 7 + ["maybe"], index)
    # official leave-one-out: yes (2 of 10): (2 * min(1, 1/3) + 8 * min(1, 2/3)) / 10 = 0.6; no (7): 1
    assert scores.tolist() == pytest.approx([0.6, 1.0, 0.0, 0.0])
    assert target.sum().item() == pytest.approx(1.0)
    assert target.tolist() == pytest.approx([x / (2 / 3 + 1 + 1 / 3) for x in (2 / 3, 1, 0, 1 / 3)])
    # one answer: plain accuracy (score 1 for it), one-hot target
    scores, target = answer_scores(["2"], index)
    assert scores.tolist() == [0, 0, 1, 0] and target.tolist() == [0, 0, 1, 0]
    # only unknown answers: nothing can score, the target is the unknown class
    scores, target = answer_scores(["purple"], index)
    assert scores.sum() == 0 and target.tolist() == [0, 0, 0, 1]


def test_accuracy_and_majority_baseline_on_hand_made_logits():
    task = ClassificationTask()
    index = {"yes": 0, "no": 1, "red": 2}
    rows = [["yes"] * 3, ["no"] * 10, ["red"], ["red"] * 2 + ["no"] * 8]
    scores = torch.stack([answer_scores(r, index)[0] for r in rows])
    # predictions: yes (3 of 3 annotators: each left out leaves 2 matches -> 2/3), no (1.0), yes (0.0), and
    # the unknown column is highest on row 3 but is never predicted: its best real class is red (2 of 10:
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6)
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 1.0, 9.0]])
    valid = torch.tensor([True, True, True, True])
    values = task.eval_values({"logits": logits}, {"scores": scores, "valid": valid})
    m = task.metrics(values)
    assert m["accuracy"] == pytest.approx((2 / 3 + 1 + 0 + 0.6) / 4)
    # majority answer = vocabulary[0] = "yes": scores 2/3, 0, 0, 0
    assert m["majority_baseline"] == pytest.approx((2 / 3) / 4)
    assert m["count"] == 4
    values["valid"] = torch.tensor([True, True, False, True])  # a masked bad row is not scored
    assert task.metrics(values)["accuracy"] == pytest.approx((2 / 3 + 1 + 0.6) / 3)


def test_vqav2_layout_dataset_and_bad_rows(tmp_path):
    folder = write_vqav2_layout(tmp_path)
    cfg = tiny_config(
        *VQA,
        f"data.dataset={folder}",
        "data.columns={image: image, question: question, answer: answers}",
        "data.num_answers=3",
    )
    ds = load_split(cfg.data, "validation")
    vocab, stats = build_vocabulary(ds["answers"], 3)
    model_cfg = cfg.model
    model_cfg.answers = vocab
    model = VLFuseModel(model_cfg)
    dataset = ClassificationTask().build_dataset(cfg, model, "validation", train=False)
    expected_unknown = sum(not ({a["answer"].lower() for a in cell} & set(vocab)) for cell in ds["answers"])
    assert len(dataset) == 24 and dataset.counts["unknown_answer"] == expected_unknown
    example = dataset[0]
    assert example.scores.shape == (4,) and example.target.sum().item() == pytest.approx(1.0)
    collate = ClassificationCollator(model.text_encoder.tokenize, keep_bad=True)
    batch = collate([dataset[i] for i in range(4)])
    assert batch["scores"].shape == (4, 4) and batch["targets"].shape == (4, 4)
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["valid"].all()
    out = model(**batch)
    assert out["logits"].shape == (4, 4)
    # a sliced split and a plain-string answer column (merve/vqav2-small's multiple_choice_answer)
    cfg2 = tiny_config(
        *VQA,
        f"data.dataset={folder}",
        "data.columns={image: image, question: question, answer: multiple_choice_answer}",
    )
    sliced = ClassificationTask().build_dataset(cfg2, model, "validation[20:]", train=False)
    assert len(sliced) == 4
    assert all(sliced[i].scores.max().item() in (0.0, 1.0) for i in range(4))


def test_question_without_answer_is_a_counted_bad_row(tmp_path):
    import datasets
    from PIL import Image

    folder = tmp_path / "vqa"
    (folder / "data").mkdir(parents=True)
    rows = {
        "image": [Image.new("RGB", (40, 40))] * 4,
        "question": ["what?", "why?", "how?", "who?"],
        "answer": ["yes", "", "no", None],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    cfg = tiny_config(*VQA, f"data.dataset={folder}", "data.columns={question: question, answer: answer}")
    cfg.model.answers = ["yes", "no"]
    model = VLFuseModel(cfg.model)
    dataset = ClassificationTask().build_dataset(cfg, model, "validation", train=False)
    assert dataset.counts["missing_answer"] == 2
    batch = ClassificationCollator(model.text_encoder.tokenize, keep_bad=True)([dataset[i] for i in range(4)])
    assert batch["valid"].tolist() == [True, False, True, False] and int(batch["bad_rows"]) == 2


def test_predict_answers_after_save_and_load(tmp_path):
    from PIL import Image

    cfg = tiny_config(*VQA)
    cfg.model.answers = ["yes", "no", "red", "2"]
    model = VLFuseModel(cfg.model)
    images = [Image.new("RGB", (90, 40), (200, 20, 20)), Image.new("RGB", (30, 70))]
    answers = model.predict(images, ["what colour is it?", "is there a circle?"])
    assert len(answers) == 2 and set(answers) <= {"yes", "no", "red", "2"}
    model.save_pretrained(tmp_path / "saved")
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.answers == ["yes", "no", "red", "2"]
    assert loaded.answer_vocabulary[-1] == "unknown"
    assert loaded.predict(images, ["what colour is it?", "is there a circle?"]) == answers
    with pytest.raises(ValueError, match="embeddings come from a retrieval model"):
        loaded.embed_texts("a")


def test_init_from_a_model_of_another_task_is_refused(tmp_path):
    from vlfuse.schema import ConfigError
    from vlfuse.training import build_model

    cfg = tiny_config(*VQA)
    cfg.model.answers = ["yes", "no"]
    VLFuseModel(cfg.model).save_pretrained(tmp_path / "vqa")
    grounding = tiny_config(f"model.init_from={tmp_path / 'vqa'}")
    with pytest.raises(ConfigError, match="is a 'vqa' model, but model.task='grounding'"):
        build_model(grounding)
    assert build_model(grounding, check_task=False).config.answers == ["yes", "no"]
