"""Image-text retrieval: a shared embedding space learned with a symmetric contrastive (InfoNCE) loss.

The fusion for this task is ``projection``: each tower's pooled vector is projected to ``fusion.dim``;
the head L2-normalizes both and holds the learnable temperature. With several processes, every rank
scores its images against the texts of *all* ranks (and its texts against all images): the embeddings
are gathered with their gradients, so the loss and its gradient equal those of one process holding the
whole global batch (transformers' dual encoders gather without gradients).

Metrics are Recall@1/5/10 in both directions over the whole evaluation split: an image counts as found
for a caption if it ranks in the top K; for an image, if any of its captions does. Evaluation batches hold
images with all of their captions, so each image is encoded once. Ties are counted
against the model (a collapsed model that scores everything equally gets chance-level recall, not 1).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlfuse.fusion.heads import FusionOutput

RECALL_AT = (1, 5, 10)
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature


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


# -------------------------------------------------------------------------------- gather with gradients
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGather(torch.autograd.Function):
    """Concatenates every rank's rows (sizes may differ). Backward: each rank's rows receive the sum
    over ranks of the gradient with respect to them (an all-reduce, which every backend has)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every rank's rows of ``x`` concatenated in rank order, differentiable.

    Returns:
        (the gathered rows, this rank's first row in them, the total number of rows)
    """
    world, rank = _world()
    if world == 1:
        return x, 0, x.shape[0]
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    return _AllGather.apply(x, sizes, rank), sum(sizes[:rank]), sum(sizes)


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE over the global batch (all ranks): image i and text i are the positive pair.

    Each rank's loss is its rows' share of the global mean, scaled by the number of ranks, so that the
    ranks' average (what DDP's gradient averaging optimizes) is exactly the one-process loss on the
    concatenated batch, also when bad rows left the ranks with different batch sizes.
    """
    all_images, offset, total = gather_with_grad(image_embeds)
    all_texts, _, _ = gather_with_grad(text_embeds)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    i2t = F.cross_entropy(logit_scale * image_embeds @ all_texts.T, labels, reduction="sum")
    t2i = F.cross_entropy(logit_scale * text_embeds @ all_images.T, labels, reduction="sum")
    world, _ = _world()
    scale = world / total
    loss = (i2t + t2i) / 2 * scale
    return loss, {"i2t": (i2t * scale).detach(), "t2i": (t2i * scale).detach()}


# -------------------------------------------------------------------------------------------- metrics
def _i2t_ranks(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each image (row): how many non-matching texts score at least as high as its best match."""
    best = similarity.masked_fill(~positive, float("-inf")).max(dim=1).values
    return ((similarity >= best[:, None]) & ~positive).sum(dim=1)


def _t2i_ranks(similarity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each text (row): how many other images score at least as high as its own image."""
    own = similarity.gather(1, target[:, None])
    return (similarity >= own).sum(dim=1) - 1


def recall_from_similarity(similarity: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """Recall@K both ways from an image x text similarity matrix.

    Args:
        similarity: ``[num_images, num_texts]``.
        text_image: ``[num_texts]``, the image (row of ``similarity``) each text belongs to.
    """
    positive = text_image[None, :] == torch.arange(similarity.shape[0])[:, None]
    return _recalls(_i2t_ranks(similarity, positive), _t2i_ranks(similarity.T, text_image))


def _recalls(i2t: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_AT:
            out[f"{name}_r@{k}"] = (ranks < k).float().mean().item()
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
    i2t = torch.cat(
        [
            _i2t_ranks(
                images[s : s + chunk] @ texts.T,
                text_image[None, :] == torch.arange(s, min(s + chunk, n_images))[:, None],
            )
            for s in range(0, n_images, chunk)
        ]
    )
    t2i = torch.cat(
        [
            _t2i_ranks(texts[s : s + chunk] @ images.T, text_image[s : s + chunk])
            for s in range(0, n_texts, chunk)
        ]
    )
    out = _recalls(i2t, t2i)
    out.update(images=n_images, texts=n_texts, chance_r1=1.0 / n_images)
    return out


class RetrievalTask:
    """Images and captions -> a shared embedding: data, loss and metrics for the shared training loop."""

    name = "retrieval"
    primary_metric = "mean_recall"
    # The metrics a comparison table shows.
    report_metrics = ("i2t_r@1", "t2i_r@1", "t2i_r@5", "mean_recall")

    def build_dataset(self, cfg, model, split: str, train: bool):
        from vlfuse.data.retrieval import RetrievalDataset
        from vlfuse.tasks.base import build_image_text_dataset

        dataset = build_image_text_dataset(RetrievalDataset, cfg, model, split, train)
        # Evaluation encodes each image once, with all of its captions.
        return dataset if train else dataset.by_image()

    def collator(self, model, train: bool):
        from vlfuse.data.retrieval import RetrievalCollator, RetrievalImagesCollator

        if train:
            return RetrievalCollator(model.text_encoder.tokenize)
        return RetrievalImagesCollator(model.text_encoder.tokenize)

    def loss(self, outputs, batch):
        return contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"])

    def eval_values(self, outputs, batch):
        b, c = batch["text_valid"].shape
        return {
            "image_embeds": outputs["image_embeds"],
            "text_embeds": outputs["text_embeds"].reshape(b, c, -1),
            "text_valid": batch["text_valid"],
            "valid": batch["valid"],
        }

    def metrics(self, values):
        keep = values["valid"].bool()
        text_valid = values["text_valid"][keep].bool()
        images = values["image_embeds"][keep]
        texts = values["text_embeds"][keep][text_valid]
        text_image = torch.arange(len(images)).repeat_interleave(text_valid.sum(dim=1))
        return retrieval_metrics(images, texts, text_image)
