"""What every schema module shares: the choices of the enumerated settings, ``ConfigError``, and the
field helpers that declare a key's allowed values (read by ``vlfuse.schema.validate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any

TRAINABLE_ENCODERS = ("none", "image", "text", "all")
FUSION_NAMES = ("concat", "transformer", "dense", "projection")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
MIXED_PRECISION = ("no", "fp16", "bf16")
# How a trainable tower learns (see LoraSettings and the towers' last_blocks).
TUNING = ("full", "lora", "last_blocks")
# recipes/compare.py's modes: a trainable_encoders value, or both towers trained with that tuning.
COMPARE_MODES = (*TRAINABLE_ENCODERS, "lora", "last_blocks")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


def one_of(default: str, choices: Sequence[str]) -> Any:
    """A field whose value must be one of ``choices``."""
    return field(default=default, metadata={"choices": tuple(choices)})


def at_least(default: Any, minimum: float) -> Any:
    """A field whose value (when set) must be at least ``minimum``."""
    return field(default=default, metadata={"min": minimum})


def trains_top_only(encoder: Any) -> bool:
    """Whether a tower's tuning leaves its stem and earlier blocks frozen when it trains (``last_blocks``,
    or ``lora`` with ``lora.last_blocks``): the frozen prefix the feature cache can serve."""
    lora_top = encoder.tuning == "lora" and encoder.lora.last_blocks is not None
    return encoder.tuning == "last_blocks" or lora_top


def top_only(model: Any) -> bool:
    """Whether either tower of a model config trains only its top (``trains_top_only``)."""
    return trains_top_only(model.image_encoder) or trains_top_only(model.text_encoder)
