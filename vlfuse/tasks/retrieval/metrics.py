"""Recall@K in both directions over a whole split, tie-aware (McSherry & Najork 2008)."""

from __future__ import annotations

import torch

RECALL_AT = (1, 5, 10)


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


def _hits_by_entry(
    queries: torch.Tensor, keys: torch.Tensor, query_owner: torch.Tensor, key_owner: torch.Tensor, chunk: int
) -> dict[int, torch.Tensor]:
    """Hit@K of each query row over all key rows (a key is a positive when its owner is the query's).

    Each score between a distinct query and a distinct key (bitwise-equal rows are one) is computed once
    and every row reads it, so identical inputs score exactly alike however the rows are laid out (a
    matrix product may round the same dot product differently in another tile)."""
    query_u, query_entry = torch.unique(queries, dim=0, return_inverse=True)
    key_u, key_entry = torch.unique(keys, dim=0, return_inverse=True)
    hits = {k: torch.empty(len(queries), dtype=torch.float64) for k in RECALL_AT}
    for start in range(0, len(query_u), chunk):
        scores = query_u[start : start + chunk] @ key_u.T  # [chunk, distinct keys]: each pair once
        in_chunk = ((query_entry >= start) & (query_entry < start + chunk)).nonzero().squeeze(1)
        for part in in_chunk.split(chunk):  # rows of the queries whose entries are in this chunk
            similarity = scores[query_entry[part] - start][:, key_entry]
            positive = query_owner[part, None] == key_owner[None, :]
            for k, h in _hits(similarity, positive).items():
                hits[k][part] = h
    return hits


def retrieval_metrics(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024
) -> dict[str, float]:
    """Recall@1/5/10 both ways over a split.

    Rows that are bitwise equal (the same input: evaluation embeds each distinct input once) are scored
    through one entry, so they tie exactly.

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
    text_image = text_image.long()
    image_owner = torch.arange(n_images)
    i2t = _hits_by_entry(images, texts, image_owner, text_image, chunk)
    t2i = _hits_by_entry(texts, images, text_image, image_owner, chunk)
    out = _recalls(i2t, t2i)
    out.update(images=n_images, texts=n_texts, chance_r1=1.0 / n_images)
    return out
