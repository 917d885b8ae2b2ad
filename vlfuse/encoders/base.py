"""The small interface both encoder towers share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """What a tower hands to the fusion head.

    Attributes:
        tokens: token features ``[B, N, C]`` (an image's flattened feature map or patch tokens; a text's
            token states); None for cached features of a fusion that reads only pooled vectors.
        pooled: one vector per input ``[B, C_pooled]``; None when not asked for.
        mask: ``[B, N]`` bool, True where a token is real (text padding is False); None for images.
        grid: ``(H, W)`` of the image token grid, ``H * W == N``; None for text.
    """

    tokens: torch.Tensor | None
    pooled: torch.Tensor | None
    mask: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    def to(self, device: torch.device) -> EncoderOutput:
        """The same features on ``device``."""
        moved = [None if t is None else t.to(device) for t in (self.tokens, self.pooled, self.mask)]
        return EncoderOutput(*moved, self.grid)

    def select(self, index: torch.Tensor) -> EncoderOutput:
        """The rows ``index`` (e.g. to pair each image with several texts without encoding it again)."""
        index = index.to((self.tokens if self.tokens is not None else self.pooled).device)
        return EncoderOutput(
            None if self.tokens is None else self.tokens[index],
            None if self.pooled is None else self.pooled[index],
            None if self.mask is None else self.mask[index],
            self.grid,
        )
