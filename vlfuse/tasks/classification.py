"""VQA-style answer classification: the fused representation -> one of the answer vocabulary's classes.

The vocabulary is built from the train split: the ``data.num_answers`` most frequent (normalized)
answers, most frequent first; every other answer maps to one extra class, ``unknown``, which is counted,
trained on (so that rare answers do not pull probability onto the known ones) and never predicted.

Where a question has several answers (VQAv2 gives ten annotators' answers), the target is VQA's soft
score per answer, ``min(1, #annotators who gave it / 3)``, normalized into a distribution, and the
metric is VQA accuracy: the predicted answer's score (Antol et al., 2015; the official script further
averages it over the ten leave-one-out subsets of the ten answers, which lowers some scores slightly).
With one answer per question, the target is that answer and the metric is plain accuracy.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlfuse.fusion.heads import FusionOutput

UNKNOWN = "unknown"
_SPACES = re.compile(r"\s+")
_TRAILING = re.compile(r"[.!?,;:]+$")


def normalize_answer(answer: str) -> str:
    """Lowercase, collapse whitespace, drop trailing punctuation: ``" Yes. "`` -> ``"yes"``."""
    return _TRAILING.sub("", _SPACES.sub(" ", answer.strip().lower())).strip()


def answers_of(value: Any) -> list[str]:
    """A dataset's answer cell as normalized strings: a string, a list of strings, or a list of
    ``{"answer": ...}`` dicts (VQAv2's ``answers``). Empty answers are dropped."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("answer")
        if isinstance(item, str) and normalize_answer(item):
            out.append(normalize_answer(item))
    return out


def build_vocabulary(answer_cells: Iterable[Any], size: int) -> tuple[list[str], dict[str, int]]:
    """The ``size`` most frequent answers over all given answers (ties broken alphabetically), and
    counts: ``questions``, ``questions_without_answer``, ``questions_unknown`` (no answer in the
    vocabulary), ``answers_total``, ``answers_distinct``."""
    freq: Counter[str] = Counter()
    cells = [answers_of(cell) for cell in answer_cells]
    for answers in cells:
        freq.update(answers)
    vocab = [a for a, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    known = set(vocab)
    stats = {
        "questions": len(cells),
        "questions_without_answer": sum(not a for a in cells),
        "questions_unknown": sum(bool(a) and not (set(a) & known) for a in cells),
        "answers_total": sum(freq.values()),
        "answers_distinct": len(freq),
    }
    return vocab, stats


def answer_scores(answers: Sequence[str], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class (vocabulary + ``unknown`` last): the VQA score of predicting it, and the training target.

    One answer: score 1 for it. Several: ``min(1, count / 3)``. Out-of-vocabulary answers add their
    score to ``unknown`` in the target only (the ``unknown`` class is never scored as correct).

    Returns:
        (scores ``[K + 1]`` with ``scores[K] = 0``, target ``[K + 1]`` summing to 1)
    """
    k = len(index)
    scores = torch.zeros(k + 1)
    target = torch.zeros(k + 1)
    counts = Counter(answers)
    for answer, n in counts.items():
        score = 1.0 if len(answers) == 1 else min(1.0, n / 3.0)
        slot = index.get(answer)
        if slot is None:
            target[k] += score
        else:
            scores[slot] = score
            target[slot] = score
    return scores, target / target.sum().clamp(min=1e-12)


class ClassificationHead(nn.Module):
    """Answer logits ``[B, K + 1]`` from a fused vector, or from a fused map by global max pooling
    (FiLM's classifier)."""

    def __init__(self, dim: int, kind: str, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in ("vector", "dense"):
            raise ValueError(f"classification needs a vector or dense fusion output, not {kind!r}")
        if num_classes < 2:
            raise ValueError(
                "classification needs an answer vocabulary (model.answers) with at least one answer"
            )
        self.kind = kind
        self.project = nn.Conv2d(dim, dim, 1) if kind == "dense" else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, num_classes)
        )

    def forward(self, fused: FusionOutput) -> dict[str, torch.Tensor]:
        if self.kind == "dense":
            x = F.relu(self.project(fused.dense)).amax(dim=(2, 3))
        else:
            x = fused.vector
        return {"logits": self.mlp(x)}


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """The best class per row, never ``unknown`` (the last)."""
    return logits[:, :-1].argmax(dim=1)


def classification_metrics(scores: torch.Tensor, majority_scores: torch.Tensor) -> dict[str, float]:
    """Accuracy (the mean score of the predictions) and the majority-answer baseline's accuracy."""
    if scores.numel() == 0:
        return {"accuracy": float("nan"), "majority_baseline": float("nan"), "count": 0}
    return {
        "accuracy": scores.float().mean().item(),
        "majority_baseline": majority_scores.float().mean().item(),
        "count": int(scores.numel()),
    }


class ClassificationTask:
    """Image + question -> answer class: vocabulary, data, loss and metrics for the shared loop."""

    name = "classification"
    primary_metric = "accuracy"
    # The metrics a comparison table shows.
    report_metrics = ("accuracy", "majority_baseline")

    def prepare(self, cfg, accelerator) -> None:
        """Builds ``model.answers`` from the train split when it is empty and no saved model is loaded."""
        if cfg.model.answers or cfg.model.init_from:
            return
        from vlfuse.data.classification import FIELDS
        from vlfuse.data.loading import DataError, check_columns
        from vlfuse.tasks.base import load_task_split

        with accelerator.main_process_first():
            ds = load_task_split(cfg, cfg.data.train_split, train=True)
        check_columns(ds, cfg.data.columns, FIELDS, f"{cfg.data.dataset}[{cfg.data.train_split}]")
        vocab, stats = build_vocabulary(ds[cfg.data.columns["answer"]], cfg.data.num_answers)
        if not vocab:
            raise DataError(
                f"no answers in column {cfg.data.columns['answer']!r} (data.columns.answer) of the train "
                f"split {cfg.data.train_split!r}: cannot build the answer vocabulary"
            )
        cfg.model.answers = vocab
        unknown, questions = stats["questions_unknown"], stats["questions"]
        accelerator.print(
            f"answer vocabulary: {len(vocab):,} of {stats['answers_distinct']:,} distinct answers "
            f"(data.num_answers={cfg.data.num_answers}); {unknown:,} of {questions:,} train questions "
            f"({unknown / max(questions, 1):.1%}) have no answer in it and train the '{UNKNOWN}' class; "
            f"most frequent: {vocab[:5]}"
        )

    def build_dataset(self, cfg, model, split: str, train: bool):
        from vlfuse.data.classification import ClassificationDataset
        from vlfuse.tasks.base import build_image_text_dataset

        dataset = build_image_text_dataset(ClassificationDataset, cfg, model, split, train)
        return dataset.with_answers(model.config.answers)

    def collator(self, model, train: bool):
        from vlfuse.data.classification import ClassificationCollator

        return ClassificationCollator(model.text_encoder.tokenize, keep_bad=not train)

    def loss(self, outputs, batch):
        loss = F.cross_entropy(outputs["logits"].float(), batch["targets"].float())
        return loss, {"ce": loss.detach()}

    def eval_values(self, outputs, batch):
        pred = predicted_classes(outputs["logits"])
        scores = batch["scores"]
        rows = torch.arange(len(pred), device=pred.device)
        # The majority answer is the vocabulary's first (most frequent in the train split).
        return {"score": scores[rows, pred], "majority": scores[:, 0], "valid": batch["valid"]}

    def metrics(self, values):
        keep = values["valid"].bool()
        return classification_metrics(values["score"][keep], values["majority"][keep])
