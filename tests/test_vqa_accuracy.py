"""VQA accuracy as the official evaluation (the VQA challenge's vqaEval.py) computes it, on hand-made
cases whose expected values follow its algorithm by hand."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL, tiny_config
from helpers import write_vqav2_layout
from test_recipes import launch, read_metrics

from vlfuse.data.answers import answer_scores, build_vocabulary, normalize_answer, vqa_accuracy
from vlfuse.data.loading import load_split
from vlfuse.model import VLFuseModel
from vlfuse.tasks.classification import ClassificationTask
from vlfuse.training import evaluate


@pytest.mark.parametrize(
    ("written", "normalized"),
    [
        ("two", "2"),  # number words -> digits
        ("None", "0"),
        ("ten dogs", "10 dogs"),
        ("the red", "red"),  # articles dropped
        ("a dog on an island", "dog on island"),
        ("red.", "red"),  # a period not before a digit goes
        ("2.5", "2.5"),  # a period before a digit stays
        ("1,000", "1000"),  # a comma inside a number: every mark is deleted
        ("yes, sir", "yes sir"),  # a mark beside a space is deleted
        ("black/white", "black white"),  # elsewhere it becomes a space
        ("dont", "don’t"),  # contractions, with the script's own (curly) apostrophe
        ("cant", "can't"),
        ("  Yes\t", "yes"),  # newline/tab to space, stripped, lowercased
    ],
)
def test_official_normalization(written, normalized):
    assert normalize_answer(written) == normalized


# ten annotators, n of whom gave the predicted answer: mean over annotators of min(1, others matching / 3)
# n=1: (1 * 0 + 9 * 1/3) / 10 = 0.3   n=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6   n=3: (3 * 2/3 + 7 * 1) / 10 = 0.9
# n>=4: every annotator left out leaves at least 3 matches -> 1
@pytest.mark.parametrize(
    ("matching", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (7, 1.0), (9, 1.0), (10, 1.0)],
)
def test_leave_one_out_over_ten_annotators(matching, expected):
    answers = ["blue"] * matching + ["green"] * (10 - matching)
    assert vqa_accuracy("blue", answers) == pytest.approx(expected)


def test_spellings_of_one_answer_match_when_the_annotators_differ():
    # "Two", "two", "2" and "2." are one answer once normalized: 4 matches -> 1.0
    assert vqa_accuracy("2", ["Two", "two", "2", "2.", "3", "3", "3", "3", "3", "3"]) == 1.0
    # "red." and "the red" are "red": 3 matches -> 0.9
    assert vqa_accuracy(
        "red", ["red.", "the red", "Red", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]
    ) == pytest.approx(0.9)
    # the prediction is normalized too
    assert vqa_accuracy("The Red.", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # identical answers are compared as written (the official script normalizes only when they differ)
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0 and vqa_accuracy("2", ["2"] * 10) == 1.0
    # one answer (a multiple_choice_answer column): plain accuracy, normalized
    assert vqa_accuracy("2", ["Two"]) == 1.0 and vqa_accuracy("3", ["Two"]) == 0.0


def test_vocabulary_merges_spellings_and_scores_are_the_official_accuracy():
    cells = [["Two", "2", "two", "2."], ["the red", "red.", "Red"], "2", [{"answer": "dont"}]]
    vocab, stats = build_vocabulary(cells, size=10)
    assert vocab == ["2", "red", "don’t"] and stats["answers_distinct"] == 3
    index = {a: i for i, a in enumerate(vocab)}
    answers = ["Two", "2", "red.", "the red", "blue", "blue", "blue", "blue", "blue", "blue"]
    scores, target = answer_scores(answers, index)
    assert scores.tolist() == pytest.approx([0.6, 0.6, 0.0, 0.0])  # "2" and "red": 2 of 10 each
    # the training target keeps the soft score min(1, n/3) of each normalized answer ("blue" -> unknown)
    assert target.tolist() == pytest.approx([x / (2 / 3 + 2 / 3 + 1) for x in (2 / 3, 2 / 3, 0, 1)])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_vqa_accuracy_is_the_same_on_one_and_two_processes(tmp_path):
    """Ten annotator answers (VQAv2 layout), an odd split size: evaluate.py on 2 processes equals one."""
    folder = write_vqav2_layout(tmp_path, rows=23)
    vqa = ["model.task=classification", "model.fusion.name=dense"]
    columns = "data.columns={image: image, question: question, answer: answers}"
    cfg = tiny_config(*vqa, f"data.dataset={folder}", columns, "data.eval_split=validation")
    vocab, _ = build_vocabulary(load_split(cfg.data, "validation")["answers"], 5)
    cfg.model.answers = vocab
    torch.manual_seed(0)
    model = VLFuseModel(cfg.model)
    model.save_pretrained(tmp_path / "model")
    AcceleratorState._reset_state(True)
    task = ClassificationTask()
    dataset = task.build_dataset(cfg, model, "validation", train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=task.collator(model, train=False))
    one = evaluate(Accelerator(cpu=True), model, task, loader)
    AcceleratorState._reset_state(True)
    launch(
        "evaluate.py",
        *TINY_MODEL,
        *vqa,
        f"data.dataset={folder}",
        columns,
        "train.eval_batch_size=4",
        f"model.init_from={tmp_path / 'model'}",
        f"train.output_dir={tmp_path / 'eval'}",
        processes=2,
    )
    two = read_metrics(tmp_path / "eval" / "metrics.jsonl")[-1]
    assert two["num_processes"] == 2 and two["count"] == one["count"] == 23
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert two["majority_baseline"] == pytest.approx(one["majority_baseline"], abs=1e-6)
