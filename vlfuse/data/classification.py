"""VQA-style examples: an image, a question and its answer(s), one example per question.

The answer column may hold a string (``multiple_choice_answer``), a list of strings or a list of
``{"answer": ...}`` dicts (VQAv2's ten annotators). Each example carries the VQA score of every class and
the soft training target (see ``vlfuse.tasks.classification.answer_scores``). A question with no answer
is a bad row: skipped in training, masked and counted in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlfuse.data.examples import BadExample, ExampleCollator, ImageTextDataset
from vlfuse.tasks.classification import answer_scores, answers_of

FIELDS = ("image", "question", "answer")


@dataclass
class ClassificationExample:
    pixel_values: torch.Tensor | None  # [3, S, S]
    text: str  # the question
    scores: torch.Tensor  # [K + 1] VQA score of predicting each class
    target: torch.Tensor  # [K + 1] soft target distribution
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class ClassificationDataset(ImageTextDataset):
    """One example per question. Takes the arguments of ``ImageTextDataset``; ``with_answers`` must be
    called with the model's answer vocabulary before examples are read."""

    FIELDS = FIELDS
    TEXT_FIELD = "question"
    TEXT_NOUN = "question"

    def with_answers(self, vocabulary: list[str]) -> ClassificationDataset:
        """Maps every example's answers onto ``vocabulary``; counts the examples with none in it."""
        self.index_of = {a: i for i, a in enumerate(vocabulary)}
        cells = self.ds[self.columns["answer"]]
        self.answers = [answers_of(cells[row]) for row, _ in self.index]
        self.counts["unknown_answer"] = sum(
            bool(a) and not any(x in self.index_of for x in a) for a in self.answers
        )
        self.counts["missing_answer"] = sum(not a for a in self.answers)
        return self

    def describe_extra(self) -> list[str]:
        c = self.counts
        parts = [f"{c['unknown_answer']:,} with no answer in the vocabulary ({len(self.index_of):,} answers)"]
        if c["missing_answer"]:
            parts.append(f"{c['missing_answer']:,} without an answer (skipped)")
        return parts

    def placeholder(self) -> ClassificationExample:
        s, k = self.image_size, len(self.index_of)
        target = torch.zeros(k + 1)
        target[k] = 1.0
        return ClassificationExample(torch.zeros(3, s, s), "", torch.zeros(k + 1), target)

    def __getitem__(self, i: int) -> ClassificationExample | BadExample:
        answers = self.answers[i]
        if not answers:
            return self.bad("bad_answer", f"row {self.index[i][0]}: no answer")
        read = self.read_image(i)
        if isinstance(read, BadExample):
            return read
        pixels, _, _ = self.pixels(read[1])
        scores, target = answer_scores(answers, self.index_of)
        return ClassificationExample(pixels, self.texts[i], scores, target)


class ClassificationCollator(ExampleCollator):
    """Batches with ``scores`` and ``targets`` besides what ``ExampleCollator`` adds."""

    def __init__(self, tokenize, keep_bad: bool = False) -> None:
        super().__init__(tokenize, {"scores": "scores", "targets": "target"}, keep_bad)
