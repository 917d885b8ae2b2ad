"""Image transforms that move the box with the image.

Images are letterboxed to a square ``S x S`` input: scaled so the longer side is ``S``, centred, padded
with the normalisation mean (zero after normalising). Boxes go through the same scale and offset. A
horizontal flip mirrors the box and swaps left/right words in the expression.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_LR_SWAP = {
    "left": "right",
    "right": "left",
    "leftmost": "rightmost",
    "rightmost": "leftmost",
    "lefter": "righter",
    "righter": "lefter",
}
_LR_PATTERN = re.compile(r"\b(" + "|".join(sorted(_LR_SWAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def swap_left_right(text: str) -> str:
    """Swaps left/right words, keeping their capitalisation ("Left" -> "Right")."""

    def repl(m: re.Match) -> str:
        word = m.group(0)
        swapped = _LR_SWAP[word.lower()]
        return swapped.capitalize() if word[0].isupper() else swapped

    return _LR_PATTERN.sub(repl, text)


def letterbox_geometry(
    width: int, height: int, size: int, box_xyxy: torch.Tensor | None = None
) -> tuple[tuple[int, int, int, int], torch.Tensor | None, torch.Tensor]:
    """Where ``letterbox`` puts a ``width x height`` image in its square, without touching pixels.

    Returns:
        ``(new_w, new_h, pad_x, pad_y)``, the box normalized ``cxcywh`` in the square (or None), and the
        meta vector (scale_x, scale_y, pad_x, pad_y, size, width, height) that ``boxes_to_pixels`` inverts.
    """
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    sx, sy = new_w / width, new_h / height
    meta = torch.tensor([sx, sy, pad_x, pad_y, size, width, height], dtype=torch.float32)
    if box_xyxy is None:
        return (new_w, new_h, pad_x, pad_y), None, meta
    # A few whole-box operations rather than a dozen per coordinate (this runs once per example);
    # the same float32 arithmetic as moving each coordinate on its own, then box_convert's cxcywh.
    scale, shift = torch.tensor([[sx, sy, sx, sy], [pad_x, pad_y, pad_x, pad_y]], dtype=torch.float32)
    moved = (box_xyxy.float() * scale + shift) / size
    corners = moved.view(2, 2)
    return (new_w, new_h, pad_x, pad_y), torch.cat([corners.sum(0) / 2, corners[1] - corners[0]]), meta


def letterbox(
    image: Image.Image, size: int, box_xyxy: torch.Tensor | None = None, interpolation: str = "bilinear"
) -> tuple[Image.Image, torch.Tensor | None, torch.Tensor]:
    """Resizes ``image`` into an ``size x size`` square, keeping its aspect ratio, centred.

    Args:
        image: an RGB PIL image of any size.
        size: the square side.
        box_xyxy: ``[4]`` absolute pixel box in the original image, or None.
        interpolation: timm's interpolation name.

    Returns:
        The square image, the box normalized ``cxcywh`` in it (or None), and the meta vector
        (scale_x, scale_y, pad_x, pad_y, size, width, height) that ``boxes_to_pixels`` inverts.
    """
    (new_w, new_h, pad_x, pad_y), target, meta = letterbox_geometry(*image.size, size, box_xyxy)
    resized = image.resize((new_w, new_h), _RESAMPLE.get(interpolation, Image.Resampling.BILINEAR))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, (pad_x, pad_y))
    return canvas, target, meta


def hflip(
    image: Image.Image, box_xyxy: torch.Tensor | None, text: str
) -> tuple[Image.Image, torch.Tensor | None, str]:
    """Mirrors the image and the box (if any); left/right words are swapped so the text stays true."""
    w = image.size[0]
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if box_xyxy is not None:
        box_xyxy = torch.stack([w - box_xyxy[2], box_xyxy[1], w - box_xyxy[0], box_xyxy[3]])
    return flipped, box_xyxy, swap_left_right(text)


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalized ``[3, H, W]`` float tensor. Letterbox padding (black) is left as it normalizes."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std))
    return (tensor - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``[3, 1, 1]`` tensors, made once per pair (``to_tensor`` runs per image).
    Read only: the arithmetic that uses them makes new tensors."""
    return (
        torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
        torch.tensor(std, dtype=torch.float32).view(3, 1, 1),
    )


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images (any sizes) as a model's input: letterboxed to ``size``, normalized, stacked; and the
    per-image letterbox meta that maps boxes back to each image's own pixels."""
    pixels, metas = [], []
    for image in images:
        square, _, meta = letterbox(image.convert("RGB"), size, None, interpolation)
        pixels.append(to_tensor(square, mean, std))
        metas.append(meta)
    return torch.stack(pixels), torch.stack(metas)
