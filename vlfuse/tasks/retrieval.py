"""Image-text retrieval: a shared embedding space learned with a symmetric contrastive (InfoNCE) loss.

The fusion for this task is ``projection``: each tower's pooled vector is projected to ``fusion.dim``;
the head L2-normalizes both and holds the learnable temperature. With several processes, every rank
scores its images against the texts of *all* ranks (and its texts against all images): the embeddings
are gathered with their gradients, so the loss and its gradient equal those of one process holding the
whole global batch (transformers' dual encoders gather without gradients).

Metrics are Recall@1/5/10 in both directions over the whole evaluation split: an image counts as found
for a caption if it ranks in the top K; for an image, if any of its captions does. Evaluation batches hold
images with all of their captions, so each image is encoded once. Exact ties are scored by their expected
value under a random order of the tied items (tie-aware recall, McSherry & Najork 2008): without ties
this is the usual sort-based recall, and a collapsed model that scores everything alike gets chance
level, neither 0 nor 1.

Examples: training reads one (image, caption) pair per caption of a row (a caption column may hold one
string or a list; Flickr30k and COCO layouts give five per image). Evaluation reads one example per
*image* with all of its captions (padded to the split's most captions per image and masked). Which rows
are one image: each row, or with ``data.columns.image_id`` the rows sharing that column's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from vlfuse.data.examples import BadExample, ExampleCollator, ImageTextDataset, Source
from vlfuse.data.transforms import hflip
from vlfuse.distributed import gather_ids, gather_with_grad, world_and_rank
from vlfuse.fusion import FusionOutput
from vlfuse.tasks.base import Task, build_image_text_dataset

RECALL_AT = (1, 5, 10)
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature


@dataclass
class RetrievalExample:
    pixel_values: torch.Tensor | None  # [3, S, S]
    text: str
    image_id: torch.Tensor  # scalar long: which image of the split this is
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RetrievalImageExample:
    """One image and all of its captions (evaluation)."""

    pixel_values: torch.Tensor | None  # [3, S, S]
    texts: list[str]  # padded with "" to the split's most captions per image
    text_valid: torch.Tensor  # [C] bool: which of ``texts`` are real
    image_id: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class RetrievalDataset(ImageTextDataset):
    """One example per (row, caption). Takes the arguments of ``ImageTextDataset``."""

    FIELDS = ("image", "text")
    TEXT_FIELD = "text"
    TEXT_NOUN = "caption"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts["images"] = len(set(self.image_ids))

    def describe_extra(self) -> list[str]:
        return [f"{self.counts['images']:,} distinct images"]

    def placeholder(self) -> RetrievalExample:
        s = self.image_size
        return RetrievalExample(torch.zeros(3, s, s), "", torch.tensor(-1))

    def example(self, source: Source) -> RetrievalExample | BadExample:
        image = self.read_image(source)
        if isinstance(image, BadExample):
            return image
        text = source.text
        if source.flip:  # left/right words in the caption are swapped with the image
            image, _, text = hflip(image, None, text)
        pixels, _, _ = self.pixels(image)
        return RetrievalExample(pixels, text, torch.tensor(source.image_id))

    def by_image(self) -> RetrievalImages:
        """The same split as one example per image with all of its captions (for evaluation)."""
        return RetrievalImages(self)


class RetrievalImages(Dataset):
    """One example per distinct image of a ``RetrievalDataset``, with all of its captions."""

    def __init__(self, base: RetrievalDataset) -> None:
        self.base = base
        self.counts = base.counts
        groups: dict[int, list[int]] = {}
        for i, image_id in enumerate(base.image_ids):
            groups.setdefault(image_id, []).append(i)
        self.groups = list(groups.items())  # (image id, its examples), in order of first appearance
        self.max_captions = max((len(g) for _, g in self.groups), default=1)

    def __len__(self) -> int:
        return len(self.groups)

    def describe(self) -> str:
        return self.base.describe() + f" (evaluated per image, up to {self.max_captions} captions each)"

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def _example(
        self, pixels: torch.Tensor | None, texts: list[str], image_id: int, features: dict[str, torch.Tensor]
    ) -> RetrievalImageExample:
        pad = self.max_captions - len(texts)
        valid = torch.tensor([True] * len(texts) + [False] * pad)
        return RetrievalImageExample(pixels, texts + [""] * pad, valid, torch.tensor(image_id), features)

    def _text_features(self, members: list[int]) -> dict[str, torch.Tensor]:
        """Cached text features of the captions ``members``, ``[C, ...]`` padded with blanks (none when
        the text tower runs live)."""
        blank = {k: v for k, v in self.base.blank_features().items() if k.startswith("text_")}
        if not blank:
            return {}
        rows = [self.base.text_features(i) for i in members] + [blank] * (self.max_captions - len(members))
        return {k: torch.stack([row[k] for row in rows]) for k in blank}

    def __getitem__(self, j: int) -> RetrievalImageExample | BadExample:
        image_id, members = self.groups[j]
        first = self.base[members[0]]  # the image (pixels, or its cached features), read once
        if isinstance(first, BadExample):
            image = {k: v for k, v in first.placeholder.features.items() if k.startswith("image_")}
            placeholder = self._example(
                first.placeholder.pixel_values, [], -1, {**image, **self._text_features([])}
            )
            return BadExample(first.reason, first.detail, placeholder)
        image = {k: v for k, v in first.features.items() if k.startswith("image_")}
        texts = [self.base.texts[i] for i in members]
        return self._example(first.pixel_values, texts, image_id, {**image, **self._text_features(members)})


class RetrievalCollator(ExampleCollator):
    """Training batches of (image, caption) pairs with ``image_ids``, besides what ``ExampleCollator``
    adds."""

    fields = {"image_ids": "image_id"}


class RetrievalImagesCollator(ExampleCollator):
    """Evaluation batches of images with their captions: ``pixel_values`` ``[B, ...]``, the captions
    tokenized flat ``[B * C, T]`` (image-major), ``text_valid`` ``[B, C]`` and ``image_ids`` ``[B]``."""

    fields = {"image_ids": "image_id", "text_valid": "text_valid"}

    def __init__(self, tokenize) -> None:
        super().__init__(tokenize, keep_bad=True)

    def texts(self, examples: list[RetrievalImageExample]) -> list[str]:
        return [t for e in examples for t in e.texts]

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        for key in ("text_tokens", "text_mask", "text_pooled"):  # cached, [B, C, ...] -> [B * C, ...]
            if key in batch:
                batch[key] = batch[key].flatten(0, 1)
        return batch


# ------------------------------------------------------------------------------------ head, loss, metrics
class RetrievalHead(nn.Module):
    """L2-normalized image and text embeddings and the learnable temperature (as ``log(1/T)``)."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self, fused: FusionOutput) -> dict[str, torch.Tensor]:
        out = {"logit_scale": self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)}
        if fused.image is not None:
            out["image_embeds"] = F.normalize(fused.image.float(), dim=-1)
        if fused.text is not None:
            out["text_embeds"] = F.normalize(fused.text.float(), dim=-1)
        return out


def _multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``-log sum_{positives} softmax(row)`` (one positive per row: cross-entropy)."""
    logits = logits.float()
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).sum()


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE over the global batch (all ranks): image i and text i are a positive pair.

    With ``image_ids`` (which image of the split each row shows), every caption of the same image is a
    positive, never a negative: each anchor's loss is ``-log`` of the softmax probability summed over its
    positives (multi-positive InfoNCE, as MIL-NCE, Miech et al. 2020, writes it). Two captions of one image
    in a global batch (likely with five captions per Flickr image) are then never pushed away from their
    image: how the probability splits among an anchor's positives does not change its loss. (Averaging
    the log-probabilities over the positives instead, SupCon's L_out, equals plain InfoNCE when the
    repeated images are the same pixels, so it would not remove the false negatives.) Without repeats it
    is plain InfoNCE.

    Each rank's loss is its rows' share of the global mean, scaled by the number of ranks, so that the
    ranks' average (what DDP's gradient averaging optimizes) is exactly the one-process loss on the
    concatenated batch, also when bad rows left the ranks with different batch sizes.
    """
    all_images, offset, total = gather_with_grad(image_embeds)
    all_texts, _, _ = gather_with_grad(text_embeds)
    n = image_embeds.shape[0]
    if image_ids is None:
        positive = torch.zeros(n, total, dtype=torch.bool, device=image_embeds.device)
        positive[torch.arange(n), torch.arange(n) + offset] = True
    else:
        image_ids = image_ids.to(image_embeds.device)
        positive = image_ids[:, None] == gather_ids(image_ids)[None, :]
    i2t = _multi_positive_nce(logit_scale * image_embeds @ all_texts.T, positive)
    # text i's positives are the images of its own image: the same rows of the same matrix
    t2i = _multi_positive_nce(logit_scale * text_embeds @ all_images.T, positive)
    world, _ = world_and_rank()
    scale = world / total
    loss = (i2t + t2i) / 2 * scale
    return loss, {"i2t": (i2t * scale).detach(), "t2i": (t2i * scale).detach()}


# -------------------------------------------------------------------------------------------- metrics
def _tie_counts(similarity: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per query (row): negatives scoring above its best positive, negatives tied with it, and positives
    tied with it (the best one included)."""
    best = similarity.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    negative = ~positive
    above = ((similarity > best) & negative).sum(dim=1)
    tied_negatives = ((similarity == best) & negative).sum(dim=1)
    tied_positives = ((similarity == best) & positive).sum(dim=1)
    return above, tied_negatives, tied_positives


def _expected_hits(
    above: torch.Tensor, tied_neg: torch.Tensor, tied_pos: torch.Tensor, k: int
) -> torch.Tensor:
    """Tie-aware hit@K (McSherry & Najork, 2008): the probability that a positive is in the top K when
    tied items come in random order. ``n = K - above`` places are left for the tied block; all of them go
    to negatives with probability ``C(t, n) / C(t + m, n)``."""
    places = k - above
    all_negative = torch.ones(above.shape, dtype=torch.float64)
    for i in range(k):
        left = (tied_neg - i).double()
        factor = torch.where(left > 0, left / (tied_neg + tied_pos - i).double().clamp(min=1), 0.0)
        all_negative = torch.where(places > i, all_negative * factor, all_negative)
    return torch.where(places > 0, 1.0 - all_negative, 0.0)


def _hits(similarity: torch.Tensor, positive: torch.Tensor) -> dict[int, torch.Tensor]:
    counts = _tie_counts(similarity, positive)
    return {k: _expected_hits(*counts, k) for k in RECALL_AT}


def recall_from_similarity(similarity: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """Recall@K both ways from an image x text similarity matrix.

    Args:
        similarity: ``[num_images, num_texts]``.
        text_image: ``[num_texts]``, the image (row of ``similarity``) each text belongs to.
    """
    positive = text_image[None, :] == torch.arange(similarity.shape[0])[:, None]
    return _recalls(_hits(similarity, positive), _hits(similarity.T, positive.T))


def _recalls(i2t: dict[int, torch.Tensor], t2i: dict[int, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, hits in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_AT:
            out[f"{name}_r@{k}"] = hits[k].mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def retrieval_metrics(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024
) -> dict[str, float]:
    """Recall@1/5/10 both ways over a split.

    Args:
        image_embeds: ``[I, D]``, one row per image.
        text_embeds: ``[T, D]``, one row per caption.
        text_image: ``[T]``, the image (row of ``image_embeds``) each caption belongs to.
        chunk: rows of the similarity matrix computed at a time (memory stays ``chunk x max(I, T)``).
    """
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    if n_images == 0 or n_texts == 0:
        nan = {f"{d}_r@{k}": float("nan") for d in ("i2t", "t2i") for k in RECALL_AT}
        return {**nan, "mean_recall": float("nan"), "images": n_images, "texts": n_texts}
    images, texts = image_embeds.float(), text_embeds.float()
    i2t_parts, t2i_parts = [], []
    for s in range(0, n_images, chunk):
        positive = text_image[None, :] == torch.arange(s, min(s + chunk, n_images))[:, None]
        i2t_parts.append(_hits(images[s : s + chunk] @ texts.T, positive))
    for s in range(0, n_texts, chunk):
        positive = text_image[s : s + chunk, None] == torch.arange(n_images)[None, :]
        t2i_parts.append(_hits(texts[s : s + chunk] @ images.T, positive))
    i2t = {k: torch.cat([part[k] for part in i2t_parts]) for k in RECALL_AT}
    t2i = {k: torch.cat([part[k] for part in t2i_parts]) for k in RECALL_AT}
    out = _recalls(i2t, t2i)
    out.update(images=n_images, texts=n_texts, chance_r1=1.0 / n_images)
    return out


class RetrievalTask(Task):
    """Images and captions -> a shared embedding space."""

    name = "retrieval"
    recipe = "recipes/retrieval.py"
    primary_metric = "mean_recall"
    report_metrics = ("i2t_r@1", "t2i_r@1", "t2i_r@5", "mean_recall")
    fusions = ("projection",)
    feature_cache = True

    def build_head(self, cfg, fusion):
        return RetrievalHead(cfg.temperature)

    def build_dataset(self, cfg, model, split: str, train: bool):
        dataset = build_image_text_dataset(RetrievalDataset, cfg, model, split, train)
        # Evaluation encodes each image once, with all of its captions.
        return dataset if train else dataset.by_image()

    def with_cache(self, dataset, cache):
        if isinstance(dataset, RetrievalImages):  # evaluation: the per-caption examples are cached
            return RetrievalImages(cache(dataset.base))
        return cache(dataset)

    def collator(self, model, train: bool):
        if train:
            return RetrievalCollator(model.text_encoder.tokenize)
        return RetrievalImagesCollator(model.text_encoder.tokenize)

    def loss(self, outputs, batch):
        return contrastive_loss(
            outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], batch["image_ids"]
        )

    def example_values(self, outputs, batch):
        b, c = batch["text_valid"].shape
        return {
            "image_embeds": outputs["image_embeds"],
            "text_embeds": outputs["text_embeds"].reshape(b, c, -1),
            "text_valid": batch["text_valid"],
        }

    def metrics_of(self, values):
        text_valid = values["text_valid"].bool()
        images = values["image_embeds"]
        texts = values["text_embeds"][text_valid]
        text_image = torch.arange(len(images)).repeat_interleave(text_valid.sum(dim=1))
        return retrieval_metrics(images, texts, text_image)

    def predict(self, model, images, texts):
        """``{"image_embeds": [N, D], "text_embeds": [M, D], "similarity": [N, M]}`` (unit embeddings;
        either input may be omitted, and the similarity needs both)."""
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["image_embeds"] = self.embed(model, images=images)
        if texts is not None:
            out["text_embeds"] = self.embed(model, texts=texts)
        if not out:
            raise ValueError("predict needs images, texts or both")
        if len(out) == 2:
            out["similarity"] = out["image_embeds"] @ out["text_embeds"].T
        return out

    def embed(self, model, images=None, texts=None):
        """Unit-length embeddings of ``images`` (``[N, D]``) or of ``texts`` (``[M, D]``)."""
        if images is not None:
            images = [images] if isinstance(images, Image.Image) else images
            return model.infer(images=images)[0]["image_embeds"].cpu()
        texts = [texts] if isinstance(texts, str) else texts
        return model.infer(texts=texts)[0]["text_embeds"].cpu()
