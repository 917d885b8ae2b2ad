"""Fusion heads: image tokens + text tokens -> a fused vector or a fused feature map.

Each head takes the two towers' ``EncoderOutput``s and returns a ``FusionOutput``: ``vector`` ``[B, D]``
(concat, transformer), ``dense`` ``[B, D, H, W]`` (dense), or separate ``image`` / ``text`` embeddings
``[B, D]`` (projection, for retrieval: the towers meet only in the similarity). Heads are chosen by name
from ``FUSION_HEADS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlfuse.encoders.base import EncoderOutput
from vlfuse.schema import FusionConfig


@dataclass
class FusionOutput:
    # [B, D] for vector heads.
    vector: torch.Tensor | None = None
    # [B, D, H, W] for dense heads.
    dense: torch.Tensor | None = None
    # [B, D] each for the projection head (either may be None when only one modality was given).
    image: torch.Tensor | None = None
    text: torch.Tensor | None = None


@dataclass
class TowerShape:
    """What a fusion head needs to know about a tower to size its layers."""

    token_dim: int
    pooled_dim: int
    num_tokens: int
    grid: tuple[int, int] | None = None


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class ConcatFusion(nn.Module):
    """Pooled image ++ pooled text -> MLP. The simplest baseline; no token interaction."""

    output_kind = "vector"
    uses_tokens = False  # reads the towers' token features (else only their pooled vectors)
    uses_image_pooled = True
    single_modality = False

    def __init__(self, cfg: FusionConfig, image: TowerShape, text: TowerShape) -> None:
        super().__init__()
        self.image_norm = nn.LayerNorm(image.pooled_dim)
        self.text_norm = nn.LayerNorm(text.pooled_dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = _mlp(image.pooled_dim + text.pooled_dim, hidden, cfg.dim, cfg.dropout)
        self.dim = cfg.dim

    def forward(self, image: EncoderOutput, text: EncoderOutput) -> FusionOutput:
        fused = torch.cat([self.image_norm(image.pooled), self.text_norm(text.pooled)], dim=-1)
        return FusionOutput(vector=self.mlp(fused))


class TransformerFusion(nn.Module):
    """TransVG-style: projected image and text tokens, modality and position embeddings, learnable query
    token(s), through a transformer encoder; the first query's output is the fused vector."""

    output_kind = "vector"
    uses_tokens = True  # reads the towers' token features (else only their pooled vectors)
    uses_image_pooled = False
    single_modality = False

    def __init__(self, cfg: FusionConfig, image: TowerShape, text: TowerShape, max_text_len: int = 512):
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.image_proj = nn.Sequential(nn.Linear(image.token_dim, d), nn.LayerNorm(d))
        self.text_proj = nn.Sequential(nn.Linear(text.token_dim, d), nn.LayerNorm(d))
        self.image_grid = image.grid or (1, image.num_tokens)
        self.image_pos = nn.Parameter(torch.zeros(1, d, *self.image_grid))
        self.text_pos = nn.Parameter(torch.zeros(1, max_text_len, d))
        self.modality = nn.Parameter(torch.zeros(3, d))  # query, text, image
        self.queries = nn.Parameter(torch.zeros(1, cfg.num_queries, d))
        for p in (self.image_pos, self.text_pos, self.modality, self.queries):
            nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.num_heads,
            int(d * cfg.mlp_ratio),
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.num_queries = cfg.num_queries

    def _image_pos(self, grid: tuple[int, int] | None, n: int) -> torch.Tensor:
        pos = self.image_pos
        target = grid or (1, n)
        if tuple(target) != tuple(self.image_grid):
            pos = F.interpolate(pos, size=target, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, image: EncoderOutput, text: EncoderOutput) -> FusionOutput:
        b = image.tokens.shape[0]
        img = (
            self.image_proj(image.tokens)
            + self._image_pos(image.grid, image.tokens.shape[1])
            + self.modality[2]
        )
        n_text = text.tokens.shape[1]
        if n_text > self.text_pos.shape[1]:
            raise ValueError(f"text has {n_text} tokens; the fusion head supports {self.text_pos.shape[1]}")
        txt = self.text_proj(text.tokens) + self.text_pos[:, :n_text] + self.modality[1]
        q = self.queries.expand(b, -1, -1) + self.modality[0]
        x = torch.cat([q, txt, img], dim=1)
        text_mask = text.mask if text.mask is not None else torch.ones(txt.shape[:2], dtype=torch.bool)
        valid = torch.cat(
            [
                torch.ones(b, self.num_queries, dtype=torch.bool, device=x.device),
                text_mask.to(x.device),
                torch.ones(b, img.shape[1], dtype=torch.bool, device=x.device),
            ],
            dim=1,
        )
        x = self.encoder(x, src_key_padding_mask=~valid)
        return FusionOutput(vector=self.norm(x[:, 0]))


class _FiLMBlock(nn.Module):
    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.GroupNorm(8 if dim % 8 == 0 else 1, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.GroupNorm(8 if dim % 8 == 0 else 1, dim, affine=False)
        self.film = nn.Linear(text_dim, 2 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(text).chunk(2, dim=-1)
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        h = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return x + F.relu(h)


class DenseFusion(nn.Module):
    """The text conditions every location of the image feature map (FiLM), with coordinate channels so
    that locations know where they are. Converges far faster from scratch than a token transformer.

    Each FiLM block reads its own attention-pooled view of the text tokens (so one block can pick out a
    landmark phrase and a later one the relation), and a final attention layer over all locations and
    text tokens relates distant objects ("left of the green triangle").
    """

    output_kind = "dense"
    uses_tokens = True  # reads the towers' token features (else only their pooled vectors)
    uses_image_pooled = False
    single_modality = False

    def __init__(self, cfg: FusionConfig, image: TowerShape, text: TowerShape) -> None:
        super().__init__()
        if image.grid is None:
            raise ValueError("fusion 'dense' needs an image encoder with a spatial token grid")
        d = cfg.dim
        self.dim = d
        self.image_proj = nn.Conv2d(image.token_dim + 2, d, 1)
        self.text_proj = nn.Sequential(nn.Linear(text.pooled_dim, d), nn.LayerNorm(d), nn.GELU())
        self.text_tokens = nn.Sequential(nn.Linear(text.token_dim, d), nn.LayerNorm(d))
        self.block_queries = nn.Parameter(torch.randn(cfg.num_layers, d) * 0.02)
        self.query_from_text = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_FiLMBlock(d, d) for _ in range(cfg.num_layers))
        heads = cfg.num_heads if d % cfg.num_heads == 0 else 1
        self.relate = nn.TransformerEncoderLayer(
            d,
            heads,
            int(d * cfg.mlp_ratio),
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.text_type = nn.Parameter(torch.zeros(1, 1, d))

    @staticmethod
    def coords(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        ys = torch.linspace(-1, 1, h, device=like.device, dtype=like.dtype)
        xs = torch.linspace(-1, 1, w, device=like.device, dtype=like.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y]).unsqueeze(0).expand(b, -1, -1, -1)

    def forward(self, image: EncoderOutput, text: EncoderOutput) -> FusionOutput:
        b, n, c = image.tokens.shape
        h, w = image.grid
        fmap = image.tokens.transpose(1, 2).reshape(b, c, h, w)
        x = self.image_proj(torch.cat([fmap, self.coords(b, h, w, fmap)], dim=1))
        pooled = self.text_proj(text.pooled)
        tokens = self.text_tokens(text.tokens)  # [B, T, d]
        mask = text.mask if text.mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool)
        mask = mask.to(tokens.device)
        queries = self.block_queries.unsqueeze(0) + self.query_from_text(pooled).unsqueeze(1)  # [B, L, d]
        scores = torch.einsum("bld,btd->blt", queries, tokens) / tokens.shape[-1] ** 0.5
        attn = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(dim=-1)
        per_block = torch.einsum("blt,btd->bld", attn, tokens) + pooled.unsqueeze(1)
        for i, block in enumerate(self.blocks):
            x = block(x, per_block[:, i])
        d = x.shape[1]
        seq = torch.cat([x.flatten(2).transpose(1, 2), tokens + self.text_type], dim=1)
        valid = torch.cat([torch.ones(b, h * w, dtype=torch.bool, device=x.device), mask], dim=1)
        seq = self.relate(seq, src_key_padding_mask=~valid)
        x = seq[:, : h * w].transpose(1, 2).reshape(b, d, h, w)
        return FusionOutput(dense=x)


class ProjectionFusion(nn.Module):
    """No fusion: each tower's pooled vector is normalized and projected to a shared ``dim``-wide space
    (CLIP's image and text projections). Either modality may be missing, so images and texts can be
    embedded separately and compared all against all."""

    output_kind = "embedding"
    uses_tokens = False  # reads the towers' token features (else only their pooled vectors)
    uses_image_pooled = True
    # Each modality is embedded on its own: images or texts may come alone.
    single_modality = True

    def __init__(self, cfg: FusionConfig, image: TowerShape, text: TowerShape) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.image_proj = nn.Sequential(nn.LayerNorm(image.pooled_dim), nn.Linear(image.pooled_dim, cfg.dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text.pooled_dim), nn.Linear(text.pooled_dim, cfg.dim))

    def forward(self, image: EncoderOutput | None, text: EncoderOutput | None) -> FusionOutput:
        return FusionOutput(
            image=None if image is None else self.image_proj(image.pooled),
            text=None if text is None else self.text_proj(text.pooled),
        )


FUSION_HEADS: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion,
    "transformer": TransformerFusion,
    "dense": DenseFusion,
    "projection": ProjectionFusion,
}


def build_fusion(cfg: FusionConfig, image: TowerShape, text: TowerShape, max_text_len: int) -> nn.Module:
    """The fusion head named by ``cfg.name``."""
    if cfg.name not in FUSION_HEADS:
        raise ValueError(
            f"model.fusion.name: unknown fusion head {cfg.name!r}; allowed: {sorted(FUSION_HEADS)}"
        )
    if cfg.name == "transformer":
        return TransformerFusion(cfg, image, text, max_text_len=max_text_len)
    return FUSION_HEADS[cfg.name](cfg, image, text)


__all__ = ["FUSION_HEADS", "FusionOutput", "TowerShape", "build_fusion"]
