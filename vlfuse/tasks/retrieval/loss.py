"""The contrastive loss: symmetric multi-positive InfoNCE over the global batch, the embeddings gathered
from every process with their gradients."""

from __future__ import annotations

import torch

from vlfuse.distributed import gather_ids, gather_with_grad, world_and_rank


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
