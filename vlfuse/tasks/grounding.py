"""Visual grounding: a referring expression -> one box.

Boxes inside the model are normalized ``cxcywh`` in [0, 1] relative to the transformed image.
A vector fusion output regresses the box directly (TransVG's [REG] token); a dense output scores every
location and regresses a box there, and the best-scoring location's box wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from vlfuse.fusion.heads import FusionOutput
from vlfuse.tasks.boxes import convert_boxes, paired_iou

L1_WEIGHT = 5.0
GIOU_WEIGHT = 2.0
SCORE_WEIGHT = 1.0


class GroundingHead(nn.Module):
    """Box prediction from a fused vector ``[B, D]`` or a fused map ``[B, D, H, W]``."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        if kind not in ("vector", "dense"):
            raise ValueError(f"unknown fusion output kind {kind!r}")
        self.kind = kind
        if kind == "vector":
            self.box = nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4)
            )
        else:
            self.box = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, 5, 1))

    def forward(self, fused: FusionOutput) -> dict[str, torch.Tensor]:
        if self.kind == "vector":
            return {"boxes": self.box(fused.vector).sigmoid()}
        out = self.box(fused.dense)  # [B, 5, H, W]
        b, _, h, w = out.shape
        scores = out[:, 0].flatten(1)  # [B, H*W]
        ys = torch.arange(h, device=out.device, dtype=out.dtype).view(1, h, 1)
        xs = torch.arange(w, device=out.device, dtype=out.dtype).view(1, 1, w)
        # Each location predicts a centre inside its own cell and a free size.
        cx = (xs + out[:, 1].sigmoid()) / w
        cy = (ys + out[:, 2].sigmoid()) / h
        cell_boxes = torch.stack([cx, cy, out[:, 3].sigmoid(), out[:, 4].sigmoid()], dim=-1).flatten(1, 2)
        best = scores.argmax(dim=1)
        boxes = cell_boxes[torch.arange(b, device=out.device), best]
        return {"boxes": boxes, "scores": scores, "cell_boxes": cell_boxes, "grid": torch.tensor([h, w])}


def _box_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    l1 = F.l1_loss(pred_cxcywh.float(), target_cxcywh.float(), reduction="none").sum(-1).mean()
    giou = generalized_box_iou_loss(
        convert_boxes(pred_cxcywh.float(), "cxcywh", "xyxy"),
        convert_boxes(target_cxcywh.float(), "cxcywh", "xyxy"),
        reduction="mean",
    )
    return l1, giou


def grounding_loss(
    outputs: dict[str, torch.Tensor], target_cxcywh: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """L1 + GIoU on normalized cxcywh boxes; a dense head adds a location classification loss.

    Returns:
        The total loss and a dict of its parts (detached floats) for logging.
    """
    if "scores" not in outputs:
        l1, giou = _box_loss(outputs["boxes"], target_cxcywh)
        loss = L1_WEIGHT * l1 + GIOU_WEIGHT * giou
        return loss, {"l1": l1.detach(), "giou": giou.detach()}
    h, w = (int(v) for v in outputs["grid"])
    target = target_cxcywh.float()
    col = (target[:, 0] * w).long().clamp(0, w - 1)
    row = (target[:, 1] * h).long().clamp(0, h - 1)
    cell = row * w + col
    score_loss = F.cross_entropy(outputs["scores"].float(), cell)
    chosen = outputs["cell_boxes"][torch.arange(len(cell), device=cell.device), cell]
    l1, giou = _box_loss(chosen, target)
    loss = SCORE_WEIGHT * score_loss + L1_WEIGHT * l1 + GIOU_WEIGHT * giou
    return loss, {"score": score_loss.detach(), "l1": l1.detach(), "giou": giou.detach()}


def boxes_to_pixels(boxes_cxcywh: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Normalized cxcywh boxes in the model input -> xyxy in each original image's pixels, clipped to it.

    Args:
        boxes_cxcywh: ``[B, 4]`` in [0, 1] of the model input.
        meta: ``[B, 7]`` per image, as written by the letterbox transform: (scale_x, scale_y, pad_x, pad_y,
            input side, original width, original height), where ``input_px = original_px * scale + pad``.
    """
    meta = meta.to(boxes_cxcywh.device, torch.float32)
    xyxy = convert_boxes(boxes_cxcywh.float(), "cxcywh", "xyxy") * meta[:, 4:5]
    sx, sy, px, py = meta[:, 0:1], meta[:, 1:2], meta[:, 2:3], meta[:, 3:4]
    x = ((xyxy[:, 0::2] - px) / sx).clamp(min=0).minimum(meta[:, 5:6])
    y = ((xyxy[:, 1::2] - py) / sy).clamp(min=0).minimum(meta[:, 6:7])
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def grounding_metrics(iou: torch.Tensor) -> dict[str, float]:
    """Acc@0.5, Acc@0.75 (IoU, not GIoU) and mean IoU over per-sample IoUs."""
    iou = iou.float()
    if iou.numel() == 0:
        return {"acc@0.5": float("nan"), "acc@0.75": float("nan"), "miou": float("nan"), "count": 0}
    return {
        "acc@0.5": (iou >= 0.5).float().mean().item(),
        "acc@0.75": (iou >= 0.75).float().mean().item(),
        "miou": iou.mean().item(),
        "count": int(iou.numel()),
    }


class GroundingTask:
    """Referring expression -> box: data, loss and metrics for the shared training loop."""

    name = "grounding"
    primary_metric = "acc@0.5"
    # The metrics a comparison table shows.
    report_metrics = ("acc@0.5", "acc@0.75", "miou")

    def build_dataset(self, cfg, model, split: str, train: bool):
        from vlfuse.data.grounding import GroundingDataset
        from vlfuse.tasks.base import build_image_text_dataset

        return build_image_text_dataset(GroundingDataset, cfg, model, split, train)

    def collator(self, model, train: bool):
        from vlfuse.data.grounding import GroundingCollator

        return GroundingCollator(model.text_encoder.tokenize, keep_bad=not train)

    def loss(self, outputs, batch):
        return grounding_loss(outputs, batch["boxes"])

    def eval_values(self, outputs, batch):
        pred = boxes_to_pixels(outputs["boxes"], batch["meta"])
        return {"iou": paired_iou(pred, batch["original_boxes"].float()), "valid": batch["valid"]}

    def metrics(self, values):
        return grounding_metrics(values["iou"][values["valid"].bool()])
