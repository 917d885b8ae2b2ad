"""The small interface both encoder towers share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """What a tower hands to the fusion head.

    Attributes:
        tokens: token features ``[B, N, C]`` (an image's flattened feature map or patch tokens; a text's
            token states).
        pooled: one vector per input ``[B, C_pooled]``; None when not asked for.
        mask: ``[B, N]`` bool, True where a token is real (text padding is False); None for images.
        grid: ``(H, W)`` of the image token grid, ``H * W == N``; None for text.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    def select(self, index: torch.Tensor) -> EncoderOutput:
        """The rows ``index`` (e.g. to pair each image with several texts without encoding it again)."""
        index = index.to(self.tokens.device)
        return EncoderOutput(
            self.tokens[index],
            None if self.pooled is None else self.pooled[index],
            None if self.mask is None else self.mask[index],
            self.grid,
        )
