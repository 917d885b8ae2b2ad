"""Image-text matching (ITM): does this text describe this image? The matching head of ALBEF and BLIP.

A binary head (logits for "no match" and "match") sits on the fused vector (``concat``, ``transformer``)
or on the max-pooled fused map (``dense``). ``predict(images, texts)`` returns the match probability of
each (image, text) pair.

Training pairs: every (image, caption) example of a batch is a positive, and each image is also paired
with the caption of another image of the same batch, drawn at random among the captions of other images
whose text differs: random in-batch negatives, one per positive. They are not hard negatives (ALBEF and
BLIP pick the caption their contrastive embeddings find most similar, which needs separate image and text
embeddings that the fusion heads here do not have); random negatives cost no extra forward pass. The
pairs are formed by index (the model's ``image_index`` / ``text_index``), so each image and caption of
the batch is encoded once. The draw is keyed by the batch's content (whose order ``train.seed`` decides),
not by the global RNG, so a resumed run draws the same negatives.

Evaluation pairs: each (image, caption) example gives its positive pair and one negative pair, the image
with a caption of another image drawn from the whole split by a generator keyed by the example's index
alone, so the pairs are the same for every run, batch size and number of processes. Metrics over the
whole split: ``accuracy`` (a pair is called a match when its probability is at least 0.5), ``roc_auc``
(the probability that a positive pair scores above a negative one, ties counting one half) and ``pairs``;
chance is 0.5 for both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from vlfuse.data.captions import CaptionDataset
from vlfuse.data.examples import BadExample, ExampleCollator, Source
from vlfuse.data.loading import DataError
from vlfuse.tasks.base import ClassifierHead, Task, build_image_text_dataset, cross_entropy

# How many random draws look for a negative before a scan of the split takes over.
NEGATIVE_DRAWS = 32


@dataclass
class MatchingExample:
    pixel_values: torch.Tensor | None  # [3, S, S]
    text: str  # a caption of this image
    image_id: torch.Tensor  # scalar long: which image of the split this is
    negative: str = ""  # evaluation: a caption of another image
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class MatchingDataset(CaptionDataset):
    """Retrieval's caption examples, one per (row, caption); in evaluation each example also carries its
    negative caption. Takes the arguments of ``ImageTextDataset``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.counts["images"] < 2 and len(self):
            raise DataError(f"image-text matching needs at least two images; {self.describe()}")
        self.negative_pool: list[int] | None = None  # the examples negatives are drawn from (None: all)
        self._drawn: list[str] | None = None

    def keep_negatives_within(self, positions: list[int]) -> None:
        """Draws the evaluation negatives of the examples at ``positions`` from those examples only (a
        part of the split, ``RowView``: the held-out rows take no negative from rows trained on)."""
        self.negative_pool, self._drawn = list(positions), None

    @property
    def negatives(self) -> list[str]:
        """Each example's evaluation negative (drawn on first use, from ``negative_pool``; empty outside
        it, and in training, which draws in-batch negatives instead)."""
        if self._drawn is None:
            pool = list(range(len(self))) if self.negative_pool is None else self.negative_pool
            self._drawn = [""] * len(self)
            if not self.train:
                for i, negative in zip(pool, self._negatives(pool)):
                    self._drawn[i] = negative
        return self._drawn

    def _negatives(self, pool: list[int]) -> list[str]:
        """For each example of ``pool``: a caption of another image of ``pool`` whose text differs (any
        other image's, if there is none)."""
        n, drawn = len(pool), []
        for i in pool:
            rng = random.Random(f"vlfuse-itm-eval-{i}")
            own, found = self.image_ids[i], None
            for _ in range(NEGATIVE_DRAWS):
                j = pool[rng.randrange(n)]
                if self.image_ids[j] != own and self.texts[j] != self.texts[i]:
                    found = self.texts[j]
                    break
            if found is None:
                start = rng.randrange(n)
                others = [
                    pool[(start + k) % n] for k in range(n) if self.image_ids[pool[(start + k) % n]] != own
                ]
                differing = [j for j in others if self.texts[j] != self.texts[i]]
                found = self.texts[(differing or others or [i])[0]]
            drawn.append(found)
        return drawn

    def placeholder(self) -> MatchingExample:
        s = self.image_size
        return MatchingExample(torch.zeros(3, s, s), "", torch.tensor(-1))

    def example(self, source: Source) -> MatchingExample | BadExample:
        pair = super().example(source)
        if isinstance(pair, BadExample):
            return pair
        negative = "" if self.train or source.index is None else self.negatives[source.index]
        return MatchingExample(pair.pixel_values, pair.text, pair.image_id, negative)


class MatchingCollator(ExampleCollator):
    """Training batches: the examples' images and captions, and ``image_index`` / ``text_index`` /
    ``labels`` over the pairs: every example with its own caption (label 1), then each example that has
    one with another image's caption (label 0)."""

    fields = {"image_ids": "image_id"}

    def __init__(self, tokenize) -> None:
        super().__init__(tokenize, keep_bad=False)

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        good = [e for e in examples if not isinstance(e, BadExample)]
        ids = [int(e.image_id) for e in good]
        texts = [e.text for e in good]
        rng = random.Random(f"vlfuse-itm-train-{ids}-{texts}")
        negatives = []
        for i in range(len(good)):
            candidates = [j for j in range(len(good)) if ids[j] != ids[i] and texts[j] != texts[i]]
            if candidates:
                negatives.append((i, rng.choice(candidates)))
        n = len(good)
        batch["image_index"] = torch.tensor(list(range(n)) + [i for i, _ in negatives], dtype=torch.long)
        batch["text_index"] = torch.tensor(list(range(n)) + [j for _, j in negatives], dtype=torch.long)
        batch["labels"] = torch.tensor([1] * n + [0] * len(negatives), dtype=torch.long)
        return batch


class MatchingEvalCollator(ExampleCollator):
    """Evaluation batches: each example's image once, its caption and its negative (``[2B]`` texts), the
    pairs ``image_index`` = ``[0, 0, 1, 1, ...]`` / ``text_index`` = ``[0, 1, 2, 3, ...]`` and
    ``labels`` ``[B, 2]`` (positive, negative). Bad examples stay as masked placeholders."""

    def __init__(self, tokenize) -> None:
        super().__init__(tokenize, keep_bad=True)

    def texts(self, examples: list[MatchingExample]) -> list[str]:
        return [t for e in examples for t in (e.text, e.negative)]

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        n = len(examples)
        batch["image_index"] = torch.arange(n).repeat_interleave(2)
        batch["text_index"] = torch.arange(2 * n)
        batch["labels"] = torch.tensor([[1, 0]] * n, dtype=torch.long)
        return batch


# ------------------------------------------------------------------------------------ head, loss, metrics
def match_probability(logits: torch.Tensor) -> torch.Tensor:
    """``[P, 2]`` logits -> the probability of "match" per pair."""
    return logits.float().softmax(dim=-1)[:, 1]


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative,
    ties counting one half (the Mann-Whitney U statistic with average ranks). NaN without both classes."""
    scores, positive = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based ranks; tied scores share their mean rank
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def matching_metrics(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy at probability 0.5 and ROC-AUC over pairs (``[N]`` each)."""
    if probabilities.numel() == 0:
        return {"accuracy": float("nan"), "roc_auc": float("nan"), "pairs": 0}
    called = probabilities >= 0.5
    return {
        "accuracy": (called == labels.bool()).float().mean().item(),
        "roc_auc": roc_auc(probabilities, labels),
        "pairs": int(labels.numel()),
    }


class MatchingTask(Task):
    """Image + text -> does the text describe the image?"""

    name = "itm"
    recipe = "recipes/itm.py"
    primary_metric = "roc_auc"
    report_metrics = ("accuracy", "roc_auc")
    fusions = ("concat", "transformer", "dense")

    def build_head(self, cfg, fusion):
        return ClassifierHead(fusion.dim, fusion.output_kind, 2, cfg.fusion.dropout)

    def build_dataset(self, cfg, model, split: str, train: bool):
        return build_image_text_dataset(MatchingDataset, cfg, model, split, train)

    def collator(self, model, train: bool):
        if train:
            return MatchingCollator(model.text_encoder.tokenize)
        return MatchingEvalCollator(model.text_encoder.tokenize)

    def loss(self, outputs, batch):
        return cross_entropy(outputs["logits"], batch["labels"])

    def example_values(self, outputs, batch):
        probabilities = match_probability(outputs["logits"]).reshape(batch["labels"].shape)
        return {"probability": probabilities, "labels": batch["labels"]}

    def metrics_of(self, values):
        return matching_metrics(values["probability"].flatten(), values["labels"].flatten())

    def predict(self, model, images, texts):
        """The probability that each text describes its image (``[N]``); one image may serve all texts."""
        outputs, _ = self.paired_outputs(model, images, texts)
        return match_probability(outputs["logits"]).cpu()
