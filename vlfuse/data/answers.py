"""Answers of VQA-style datasets: normalization, the answer vocabulary and VQA's soft scores.

They live in the data layer because both the dataset (which maps each question's answers onto the
vocabulary) and the classification task (which builds the vocabulary and reads the scores) need them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

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
