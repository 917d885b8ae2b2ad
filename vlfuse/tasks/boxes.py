"""Box formats and overlap measures (torchvision.ops underneath)."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from vlfuse.config import BOX_FORMATS


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
