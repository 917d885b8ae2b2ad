"""Image-text retrieval: a shared embedding space learned with a symmetric contrastive (InfoNCE) loss.

The fusion for this task is ``projection``: each tower's pooled vector is projected to ``fusion.dim``;
the head L2-normalizes both and holds the learnable temperature. With several processes, every rank
scores its images against the texts of *all* ranks (and its texts against all images): the embeddings
are gathered with their gradients, so the loss and its gradient equal those of one process holding the
whole global batch (transformers' dual encoders gather without gradients).

Metrics are Recall@1/5/10 in both directions over the whole evaluation split: an image counts as found
for a caption if it ranks in the top K; for an image, if any of its captions does. Evaluation batches hold
images with all of their captions; each distinct image and caption (by pixels, by token ids) is embedded
once and every row reads its embedding, so identical inputs score exactly alike. Exact ties are scored by
their expected value under a random order of the tied items (tie-aware recall, McSherry & Najork 2008):
without ties this is the usual sort-based recall, and a collapsed model that scores everything alike gets
chance level, neither 0 nor 1.

Examples: training reads one (image, caption) pair per caption of a row (a caption column may hold one
string or a list; Flickr30k and COCO layouts give five per image). Evaluation reads one example per
*image* with all of its captions (padded to the split's most captions per image and masked). Which rows
are one image: each row, or with ``data.columns.image_id`` the rows sharing that column's value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlfuse.data.captions import CaptionDataset, ImageCaptions
from vlfuse.fusion import FusionOutput
from vlfuse.tasks.base import Task, build_image_text_dataset
from vlfuse.tasks.retrieval.data import RetrievalCollator, RetrievalImagesCollator
from vlfuse.tasks.retrieval.evaluation import distinct_eval_values
from vlfuse.tasks.retrieval.loss import contrastive_loss
from vlfuse.tasks.retrieval.metrics import recall_from_similarity, retrieval_metrics

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature


class RetrievalHead(nn.Module):
    """L2-normalized image and text embeddings and the learnable temperature (as ``log(1/T)``, a
    one-element vector: FSDP2 shards no scalar parameter; a saved scalar still loads)."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))
        self.register_load_state_dict_pre_hook(_scalar_logit_scale_as_vector)

    def forward(self, fused: FusionOutput) -> dict[str, torch.Tensor]:
        out = {"logit_scale": self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).squeeze(0)}
        if fused.image is not None:
            out["image_embeds"] = F.normalize(fused.image.float(), dim=-1)
        if fused.text is not None:
            out["text_embeds"] = F.normalize(fused.text.float(), dim=-1)
        return out


def _scalar_logit_scale_as_vector(module, state_dict, prefix, *args) -> None:
    """Models saved with a scalar ``logit_scale`` load into the one-element vector."""
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


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
        dataset = build_image_text_dataset(CaptionDataset, cfg, model, split, train)
        # Evaluation encodes each image once, with all of its captions.
        return dataset if train else dataset.by_image()

    def over_examples(self, dataset, wrap):
        if isinstance(dataset, ImageCaptions):  # evaluation: grouped per image over the per-caption examples
            return ImageCaptions(wrap(dataset.base))
        return wrap(dataset)

    def collator(self, model, train: bool):
        if train:
            return RetrievalCollator(model.text_encoder.tokenize)
        return RetrievalImagesCollator(model.text_encoder.tokenize)

    def loss(self, outputs, batch):
        return contrastive_loss(
            outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], batch["image_ids"]
        )

    def eval_loop(self, accelerator, model, loader):
        """Each distinct image and caption embedded once, every row scored through its entry (identical
        inputs score bitwise alike: ``vlfuse.tasks.retrieval.evaluation``)."""
        return distinct_eval_values(accelerator, model, loader)

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


__all__ = [
    "RetrievalCollator",
    "RetrievalHead",
    "RetrievalImagesCollator",
    "RetrievalTask",
    "contrastive_loss",
    "recall_from_similarity",
    "retrieval_metrics",
]
