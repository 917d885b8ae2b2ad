"""VQA-style answer classification: the fused representation -> one of the answer vocabulary's classes.

The vocabulary is built from the train split: the ``data.num_answers`` most frequent answers under the
official VQA normalization (``vlfuse.data.answers.normalize_answer``: punctuation, number words to
digits, articles, contractions), most frequent first, so "Two", "two" and "2" are one class; every other
answer maps to one extra class, ``unknown``, which is counted, trained on (so that rare answers do not
pull probability onto the known ones) and never predicted.

Where a question has several answers (VQAv2 gives ten annotators' answers), the metric ``accuracy`` is
the official VQA evaluation's (``vqa_accuracy``): the mean over the annotators of ``min(1, matches among
the other annotators / 3)``, with its normalization; the training target stays VQA's soft score per
answer, ``min(1, #annotators who gave it / 3)``, normalized into a distribution. With one answer per
question, the target is that answer and the metric is plain accuracy.

Examples: one per question. The answer column may hold a string (``multiple_choice_answer``), a list of
strings or a list of ``{"answer": ...}`` dicts (VQAv2's ten annotators). Each example carries the VQA
score of every class and the soft training target. A question with no answer is a bad row: skipped in
training, masked and counted in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlfuse.data.answers import UNKNOWN, answer_scores, answers_of, build_vocabulary, normalize_answer
from vlfuse.data.examples import BadExample, ExampleCollator, ImageTextDataset, Source
from vlfuse.data.loading import DataError, check_columns, stream_head
from vlfuse.data.subsets import image_groups, split_rows
from vlfuse.schema import ConfigError
from vlfuse.schema.mixing import training_sources
from vlfuse.tasks.base import ClassifierHead, Task, build_image_text_dataset, cross_entropy, load_task_split

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
            bool(a) and not any(normalize_answer(x) in self.index_of for x in a) for a in self.answers
        )
        self.counts["missing_answer"] = sum(not a for a in self.answers)
        return self

    def cache_settings(self) -> dict[str, Any]:
        """The feature cache's key also covers the vocabulary (the examples' scores and targets)."""
        return {**super().cache_settings(), "answers": list(self.index_of)}

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

    def example(self, source: Source) -> ClassificationExample | BadExample:
        answers = answers_of(source.row[self.columns["answer"]])
        if not answers:
            return self.bad("bad_answer", f"{source.where}: no answer")
        image = self.read_image(source)
        if isinstance(image, BadExample):
            return image
        pixels, _, _ = self.pixels(image)
        scores, target = answer_scores(answers, self.index_of)
        return ClassificationExample(pixels, source.text, scores, target)


class ClassificationCollator(ExampleCollator):
    """Batches with ``scores`` and ``targets`` besides what ``ExampleCollator`` adds."""

    fields = {"scores": "scores", "targets": "target"}


# ------------------------------------------------------------------------------------ head, loss, metrics
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


class ClassificationTask(Task):
    """Image + question -> answer class."""

    name = "vqa"
    recipe = "recipes/vqa.py"
    primary_metric = "accuracy"
    report_metrics = ("accuracy", "majority_baseline")
    fusions = ("concat", "transformer", "dense")
    # One image and one question per example, tensor labels: the frozen-feature cache serves it.
    feature_cache = True
    bad_rows = "undecodable images or no answer"

    def check_config(self, cfg) -> None:
        if cfg.data.hflip_prob > 0:
            raise ConfigError(
                f"data.hflip_prob={cfg.data.hflip_prob} with model.task=vqa: a flip would need "
                "the answer changed too (left/right answers); set data.hflip_prob=0"
            )

    def prepare(self, cfg, accelerator) -> None:
        """Builds ``model.answers`` from the train split when it is empty and no saved model is loaded."""
        if cfg.model.answers or cfg.model.init_from:
            return
        answers = []
        for source in training_sources(cfg.data):  # a mixed run: every source it trains on
            answers += self.train_answers(source.config(cfg), accelerator)
        vocab, stats = build_vocabulary(answers, cfg.data.num_answers)
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

    def train_answers(self, cfg, accelerator) -> list:
        """The answer cells of the rows this run trains on: the train split, less its held-out rows and
        outside ``data.train_subset`` (``split_rows``, as training draws them), or a stream's first
        ``data.stream_vocabulary_rows`` rows. No held-out answer enters the vocabulary."""
        split = cfg.data.train_split
        with accelerator.main_process_first():
            if cfg.data.streaming:  # the stream's first rows: a stream is not read whole before training
                rows = cfg.data.stream_vocabulary_rows
                ds = stream_head(cfg.data, split, rows, columns=[cfg.data.columns.get("answer", "answer")])
                accelerator.print(f"answer vocabulary from the first {len(ds):,} rows of the stream")
            else:
                ds = load_task_split(cfg, split, train=True)
                if cfg.data.holdout or cfg.data.train_subset is not None:  # the rows this run trains on
                    groups = image_groups(ds, cfg.data, cfg.data.columns.get("image", "image"))
                    ds = ds.select(split_rows(cfg.data, groups)["train"])
        check_columns(ds, cfg.data.columns, ("answer",), f"{cfg.data.dataset}[{split}]")
        return list(ds[cfg.data.columns["answer"]])

    def build_head(self, cfg, fusion):
        if not cfg.answers:
            raise ValueError(
                "classification needs an answer vocabulary (model.answers) with at least one answer"
            )
        return ClassifierHead(fusion.dim, fusion.output_kind, len(cfg.answers) + 1, cfg.fusion.dropout)

    def build_dataset(self, cfg, model, split: str, train: bool):
        dataset = build_image_text_dataset(ClassificationDataset, cfg, model, split, train)
        return dataset.with_answers(model.config.answers)

    def collator(self, model, train: bool):
        return ClassificationCollator(model.text_encoder.tokenize, keep_bad=not train)

    def loss(self, outputs, batch):
        return cross_entropy(outputs["logits"], batch["targets"].float())

    def example_values(self, outputs, batch):
        pred = predicted_classes(outputs["logits"])
        scores = batch["scores"]
        rows = torch.arange(len(pred), device=pred.device)
        # The majority answer is the vocabulary's first (most frequent in the train split).
        return {"score": scores[rows, pred], "majority": scores[:, 0]}

    def metrics_of(self, values):
        return classification_metrics(values["score"], values["majority"])

    def predict(self, model, images, texts):
        """The answer (a string) per (image, question) pair; one image may serve all questions."""
        outputs, _ = self.paired_outputs(model, images, texts)
        return [model.config.answers[i] for i in predicted_classes(outputs["logits"]).tolist()]

    def class_names(self, cfg):
        """``model.answers`` and the never-predicted ``unknown`` class, last."""
        return [*cfg.answers, UNKNOWN]
