"""Boxes: formats, reading a dataset's box into pixels, and overlap measures (torchvision.ops underneath).

Box preprocessing lives in the data layer so that both the transforms (which move a box with its image)
and the grounding task (loss, metrics, decoding) can import it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from vlfuse.data.loading import DataError
from vlfuse.schema import BOX_FORMATS


def convert_boxes(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Converts ``[..., 4]`` boxes between xyxy, xywh and cxcywh."""
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; allowed: {', '.join(BOX_FORMATS)}")
    if in_fmt == out_fmt:
        return boxes.clone()
    shape = boxes.shape
    return box_convert(boxes.reshape(-1, 4), in_fmt, out_fmt).reshape(shape)


def paired_iou(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``[N, 4]`` each) -> ``[N]``."""
    if a_xyxy.numel() == 0:
        return a_xyxy.new_zeros(0)
    return box_iou(a_xyxy.float(), b_xyxy.float()).diagonal()


def paired_giou(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of ``a[i]`` with ``b[i]`` -> ``[N]``."""
    if a_xyxy.numel() == 0:
        return a_xyxy.new_zeros(0)
    return generalized_box_iou(a_xyxy.float(), b_xyxy.float()).diagonal()


def to_absolute_xyxy(box: Any, box_format: str, normalized: bool, width: int, height: int) -> torch.Tensor:
    """A dataset box as absolute ``xyxy`` pixels of its image."""
    values = torch.as_tensor(box, dtype=torch.float32).flatten()
    if values.numel() != 4 or not all(math.isfinite(v) for v in values.tolist()):
        raise DataError(f"box {box!r} is not 4 finite numbers")
    xyxy = convert_boxes(values, box_format, "xyxy")
    if normalized:
        xyxy = xyxy * torch.tensor([width, height, width, height], dtype=torch.float32)
    return xyxy


def clip_box(xyxy: torch.Tensor, width: int, height: int) -> torch.Tensor | None:
    """The box clipped to the image, or None if that leaves no valid box (zero or negative width or
    height, ``x1 < x0``, or nothing inside the image)."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:  # under a pixel: nothing a model could be scored on
        return None
    return torch.tensor([x0, y0, x1, y1])
