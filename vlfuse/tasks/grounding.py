"""Visual grounding: a referring expression -> one box.

Everything specific to the task is here: the examples (image, expression, box), the box head, the loss,
the metrics and the decoding of ``predict``. Boxes are read in ``data.box_format`` (absolute pixels, or
[0, 1] with ``data.box_normalized``), checked against the image, letterboxed with it, and inside the model
are normalized ``cxcywh`` in [0, 1] relative to the transformed image. A vector fusion output regresses
the box directly (TransVG's [REG] token); a dense output scores every location and regresses a box there,
and the best-scoring location's box wins.

A text column may hold one string or a list of expressions: each becomes its own example, in training and
in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from vlfuse.data.boxes import clip_box, convert_boxes, paired_iou, to_absolute_xyxy
from vlfuse.data.examples import BadExample, ExampleCollator, ImageTextDataset, Source
from vlfuse.data.loading import DataError
from vlfuse.data.transforms import hflip
from vlfuse.fusion import FusionOutput
from vlfuse.tasks.base import Task, build_image_text_dataset

FIELDS = ("image", "text", "box")


@dataclass
class GroundingExample:
    pixel_values: torch.Tensor | None  # [3, S, S]; None when the image tower's features are cached
    text: str
    box: torch.Tensor  # [4] normalized cxcywh in the input
    original_box: torch.Tensor  # [4] xyxy in the original image's pixels
    meta: torch.Tensor  # [7] letterbox meta (see boxes_to_pixels)
    # Cached frozen-tower features (image_tokens, image_pooled, text_tokens, text_mask, text_pooled).
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class GroundingDataset(ImageTextDataset):
    """One example per (row, expression) of a split: an image, an expression and the referent's box.

    Takes the arguments of ``ImageTextDataset``; ``data.box_format`` / ``data.box_normalized`` say how
    boxes are read.
    """

    FIELDS = FIELDS
    TEXT_FIELD = "text"
    TEXT_NOUN = "expression"
    LABEL_SETTINGS = ("box_format", "box_normalized")

    def placeholder(self) -> GroundingExample:
        s = self.image_size
        return GroundingExample(
            pixel_values=torch.zeros(3, s, s),
            text="",
            box=torch.tensor([0.5, 0.5, 1.0, 1.0]),
            original_box=torch.tensor([0.0, 0.0, float(s), float(s)]),
            meta=torch.tensor([1.0, 1.0, 0.0, 0.0, s, s, s]),
        )

    def example(self, source: Source) -> GroundingExample | BadExample:
        image = self.read_image(source)
        if isinstance(image, BadExample):
            return image
        text = source.text
        w, h = image.size
        try:
            box = to_absolute_xyxy(
                source.row[self.columns["box"]], self.cfg.box_format, self.cfg.box_normalized, w, h
            )
        except (DataError, TypeError, ValueError) as err:
            return self.bad("bad_box", f"{source.where}: {err}")
        clipped = clip_box(box, w, h)
        if clipped is None:
            return self.bad(
                "bad_box", f"{source.where}: box {box.tolist()} is not a valid box in the {w}x{h} image"
            )
        if source.flip:
            image, clipped, text = hflip(image, clipped, text)
        pixels, target, meta = self.pixels(image, clipped)
        return GroundingExample(pixels, text, target, clipped, meta)


class GroundingCollator(ExampleCollator):
    """Batches of grounding examples: ``boxes`` (normalized cxcywh in the input), ``original_boxes``
    (xyxy in the original pixels) and ``meta`` (the letterbox meta), plus what ``ExampleCollator`` adds."""

    fields = {"boxes": "box", "original_boxes": "original_box", "meta": "meta"}


# ------------------------------------------------------------------------------------ head, loss, metrics
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


class GroundingTask(Task):
    """Referring expression -> box."""

    name = "grounding"
    recipe = "recipes/grounding.py"
    primary_metric = "acc@0.5"
    report_metrics = ("acc@0.5", "acc@0.75", "miou")
    fusions = ("concat", "transformer", "dense")
    feature_cache = True
    bad_rows = "undecodable images or invalid boxes"
    data_hint = "check data.columns, data.box_format, data.box_normalized and data.image_root"

    def build_head(self, cfg, fusion):
        return GroundingHead(fusion.dim, fusion.output_kind)

    def build_dataset(self, cfg, model, split: str, train: bool):
        return build_image_text_dataset(GroundingDataset, cfg, model, split, train)

    def collator(self, model, train: bool):
        return GroundingCollator(model.text_encoder.tokenize, keep_bad=not train)

    def loss(self, outputs, batch):
        return grounding_loss(outputs, batch["boxes"])

    def example_values(self, outputs, batch):
        pred = boxes_to_pixels(outputs["boxes"], batch["meta"])
        return {"iou": paired_iou(pred, batch["original_boxes"].float())}

    def metrics_of(self, values):
        return grounding_metrics(values["iou"])

    def predict(self, model, images, texts):
        """One ``xyxy`` box per (image, expression) pair, in that input image's own pixels (``[N, 4]``)."""
        outputs, meta = self.paired_outputs(model, images, texts)
        return boxes_to_pixels(outputs["boxes"], meta).cpu()
