"""A timm image encoder: any ``timm.create_model`` name, Hub or local weights, token + pooled features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import group_parameters
from torch import nn

from vlfuse.encoders.base import EncoderOutput
from vlfuse.encoders.fast import frozen_batchnorm_as_affine
from vlfuse.encoders.prefix import TowerSplit, split_tower
from vlfuse.encoders.tuning import TunableTower
from vlfuse.schema import ConfigError, ImageEncoderConfig

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm names whose architecture is read from a file
# The ``timm.create_model`` keyword arguments that only shape the network: all that a saved folder (someone
# else's file) may pass. Keywords that name a file, a URL or a loader (``checkpoint_path``,
# ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ...) are refused there: timm would read
# the file they name (before timm 1.0.26, ``checkpoint_path`` was unpickled). A user's own config may
# still pass any keyword.
SHAPE_KWARGS = frozenset(
    {
        # regularisation
        "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate",
        "pos_drop_rate", "patch_drop_rate",
        # geometry and pooling
        "output_stride", "img_size", "in_chans", "patch_size", "global_pool", "dynamic_img_size",
        "dynamic_img_pad", "strict_img_size", "class_token", "no_embed_class", "reg_tokens", "pos_embed",
        # widths, depths and block settings
        "embed_dim", "depth", "depths", "dims", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm",
        "init_values", "layer_scale_init_value", "fc_norm", "pre_norm", "final_norm", "act_layer",
        "norm_layer", "stem_type", "stem_width", "width_factor", "channel_multiplier", "depth_multiplier",
        "head_hidden_size", "conv_mlp", "use_rel_pos", "window_size",
    }
)  # fmt: skip


def check_saved_kwargs(kwargs: dict[str, Any], source: str, key: str = "model.image_encoder.kwargs") -> None:
    """Refuses timm keyword arguments read from a file (``source``) that do more than shape the network:
    any key not in ``SHAPE_KWARGS``, or a value that is not a number, a string, a bool or a list of them.

    Raises:
        ConfigError: one line naming the key and the file.
    """
    for name, value in kwargs.items():
        plain = (bool, int, float, str, type(None))
        if name not in SHAPE_KWARGS:
            raise ConfigError(
                f"{source}: {key}.{name} is not passed to timm from a saved folder (only keywords that shape "
                f"the network are: {', '.join(sorted(SHAPE_KWARGS))}); one that names a file, URL or loader "
                "is never taken from someone else's files"
            )
        if not (
            isinstance(value, plain) or (isinstance(value, list) and all(isinstance(v, plain) for v in value))
        ):
            raise ConfigError(
                f"{source}: {key}.{name} must be a number, string or list of them, not {value!r}"
            )


def _create(cfg: ImageEncoderConfig, pretrained: bool, source: str | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": 0, **cfg.kwargs}
    if cfg.checkpoint and pretrained:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.image_encoder.checkpoint: no such file: {path}")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(
                f"model.image_encoder.checkpoint: {path.name} is not a weights file ("
                f"{', '.join(WEIGHT_SUFFIXES)})"
            )
        # timm's own loader: drops the classifier for num_classes=0, resamples ViT position embeddings,
        # reads safetensors directly and .pth with weights_only=True (timm >= 1.0.26, as pyproject asks).
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    name = source or cfg.name
    if not name.startswith(SOURCE_PREFIXES) and not timm.is_model(name.split(".")[0]):
        raise ValueError(f"model.image_encoder.name: unknown timm model {name!r} (see timm.list_models())")
    try:
        # ViT-like models build their position embeddings for image_size; CNNs take any size.
        return timm.create_model(name, pretrained=pretrained, img_size=cfg.image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def timm_config(name: str) -> dict[str, Any] | None:
    """The timm config (``config.json``: architecture, pretrained config, model arguments) of a tower named
    ``hf-hub:<repo>[@revision]`` or ``local-dir:<folder>``, read where timm read it (the Hub cache, the
    folder); None for a plain timm name. A saved model carries it, so that loading contacts nothing."""
    prefix = next((p for p in SOURCE_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return None
    target = name[len(prefix) :]
    if prefix == "local-dir:":
        path = Path(target).expanduser() / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        repo, _, revision = target.partition("@")
        path = Path(hf_hub_download(repo, "config.json", revision=revision or None))
    return json.loads(path.read_text())


class ImageEncoder(TunableTower, nn.Module):
    """Wraps a timm model behind ``EncoderOutput``.

    Token features are the final feature map flattened to ``[B, H*W, C]`` for CNNs (NCHW or NHWC) and the
    patch tokens for ViT-style models (class/register prefix tokens removed); the pooled vector is timm's
    own head pooling (``forward_head(pre_logits=True)``).

    ``cfg.tuning`` says how the tower learns when it is trainable (``learnable_parameter_names``): every
    weight, LoRA adapters (added here, through peft) or timm's last blocks.

    Args:
        cfg: the image encoder section of the config.
        pretrained: overrides ``cfg.pretrained`` (``from_pretrained`` rebuilds without downloading).
        data_config: preprocessing settings to use instead of timm's (restored from a saved model).
        adapters: with ``tuning: lora``, add the adapters now (a saved model's merged weights have none).
        source: a timm name to build from instead of ``cfg.name`` (a saved model's ``local-dir:`` copy of
            an ``hf-hub:`` tower's config).
    """

    KEY = "model.image_encoder"

    def __init__(
        self,
        cfg: ImageEncoderConfig,
        pretrained: bool | None = None,
        data_config: dict | None = None,
        adapters: bool = True,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # Turns the input to channels-last order (``vlfuse.training.speed.use_channels_last`` sets it).
        self.channels_last = False
        self.model = _create(cfg, cfg.pretrained if pretrained is None else pretrained, source)
        frozen_batchnorm_as_affine(self.model)  # frozen BatchNorm layers run as a per-channel affine map
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.output_fmt = str(getattr(self.model, "output_fmt", "NCHW"))
        if data_config is None:
            data_config = dict(resolve_model_data_config(self.model))
            data_config["input_size"] = (3, cfg.image_size, cfg.image_size)
            data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
        self.data_config = data_config
        # One dry run tells the token grid and widths for any architecture.
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        self.model.train(was_training)
        self.token_dim = out.tokens.shape[-1]
        self.pooled_dim = out.pooled.shape[-1]
        self.grid = out.grid
        self.num_tokens = out.tokens.shape[1]
        if cfg.tuning == "lora" and adapters:
            self.add_adapters()

    # ------------------------------------------------------------------------------------------ tuning
    def blocks(self) -> list[list[str]]:
        """Parameter names in timm's block grouping (``group_matcher``): the stem, then each block."""
        groups = group_parameters(self.model, self.model.group_matcher(coarse=False))
        return [[f"model.{n}" for n in names] for names in groups.values()]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.data_config["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.data_config["std"])

    def forward(self, pixel_values: torch.Tensor, with_pooled: bool = True) -> EncoderOutput:
        """Token features, and the pooled vector when ``with_pooled`` (a fusion head that does not read it
        must not run the pooling head: its parameters would get no gradient, which DDP rejects)."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(pixel_values)
        return self._output(features, pixel_values.shape[-2:], with_pooled)

    def _output(self, features: torch.Tensor, image_hw, with_pooled: bool) -> EncoderOutput:
        pooled = self.model.forward_head(features, pre_logits=True) if with_pooled else None
        if features.ndim == 4:
            if self.output_fmt == "NHWC":
                features = features.permute(0, 3, 1, 2)
            grid = (features.shape[2], features.shape[3])
            tokens = features.flatten(2).transpose(1, 2)
        elif features.ndim == 3:
            tokens = features[:, self.num_prefix_tokens :]
            grid = _square_grid(tokens.shape[1], image_hw)
        else:
            raise ValueError(f"{self.cfg.name}: unexpected feature shape {tuple(features.shape)}")
        return EncoderOutput(tokens=tokens, pooled=pooled, grid=grid)

    # ----------------------------------------------------------------------------------- frozen prefix
    def cut(self, learnable: set[str]) -> TowerSplit | str:
        """The tower cut before its first learnable block (``vlfuse.encoders.prefix``), or why not."""
        return split_tower(self.model, learnable, self.cfg.image_size)

    def prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output for ``pixel_values`` (what the feature cache stores)."""
        split = self._require_split()
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return split.prefix(pixel_values)

    def forward_from_prefix(self, prefix: torch.Tensor, with_pooled: bool = True) -> EncoderOutput:
        """``forward`` from the frozen prefix's output: only the learnable blocks and the head run."""
        features = self._require_split().suffix(prefix)
        return self._output(features, (self.cfg.image_size, self.cfg.image_size), with_pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def _square_grid(n: int, image_hw: torch.Size) -> tuple[int, int]:
    """A token grid with the image's aspect ratio (patch tokens carry no explicit shape)."""
    h_px, w_px = int(image_hw[0]), int(image_hw[1])
    for h in range(1, n + 1):
        if n % h == 0 and abs(h / (n // h) - h_px / w_px) < 1e-6:
            return h, n // h
    raise ValueError(f"cannot arrange {n} patch tokens in a grid for a {h_px}x{w_px} image")
