"""An image tower cut where its trainable part starts: the frozen prefix (cached per image) and the rest.

When a tower trains only its last blocks (``tuning: last_blocks``, or LoRA with ``lora.last_blocks``), the
stem and the earlier blocks map an image to the same tensor every step. ``split_tower`` finds the tower's
*trunk*, the modules ``forward_features`` runs one after the other (a ResNet's stem and its residual
blocks, an EfficientNet's stem, blocks and head convolution, a ViT's patch embedding, position embedding,
blocks and final norm), cuts it before the first module that holds a learnable parameter, and checks on a
dry run that prefix then suffix computes what ``forward_features`` does. The feature cache stores the
prefix's output; training runs only the suffix.

A tower cannot be cut (``split_tower`` returns the reason, and the run computes the whole tower as
before) when its trunk is not a plain sequence of modules, when a learnable parameter sits in the prefix,
or when the prefix is random in training (dropout, drop path, patch dropout) or uses batch statistics
(a BatchNorm without parameters stays in training mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Children of a timm model that belong to ``forward_head`` (pooling and classifier), not the trunk.
HEAD_CHILDREN = frozenset(
    {"global_pool", "fc", "classifier", "head", "head_drop", "fc_norm", "pre_logits", "attn_pool"}
)


@dataclass
class Unit:
    """One step of the trunk: a module (or a ViT's position embedding, a method) and its name."""

    name: str  # e.g. layer4.1, blocks.10, _pos_embed
    run: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None


@dataclass
class TowerSplit:
    """A tower's trunk cut before ``boundary``: ``prefix`` (frozen, cached) then ``suffix``."""

    prefix_units: list[Unit]
    suffix_units: list[Unit]
    prefix_state: list[str]  # the tower model's state names the prefix reads (its cache key)
    prefix_shape: tuple[int, ...] = ()  # of one input's prefix output (set by the dry run)

    @property
    def boundary(self) -> str:
        """The first module the suffix runs (where the cached tensor enters), or ``forward_head`` when
        the whole trunk is frozen and only the head learns."""
        return self.suffix_units[0].name if self.suffix_units else "forward_head"

    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for unit in self.prefix_units:
            x = unit.run(x)
        return x

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.suffix_units:
            x = unit.run(x)
        return x


def trunk(model: nn.Module) -> list[Unit]:
    """The modules ``forward_features`` runs in order, nested ``nn.Sequential`` stages opened down to
    their blocks; a ViT's ``_pos_embed`` (with its ``pos_drop``) after its patch embedding."""
    units: list[Unit] = []
    vit_like = callable(getattr(model, "_pos_embed", None)) and hasattr(model, "patch_embed")

    def add(name: str, module: nn.Module) -> None:
        if isinstance(module, nn.Sequential) and len(module):
            for child_name, child in module.named_children():
                add(f"{name}.{child_name}", child)
        else:
            units.append(Unit(name, module, module))

    for name, child in model.named_children():
        if name in HEAD_CHILDREN or (vit_like and name == "pos_drop"):
            continue
        add(name, child)
        if vit_like and name == "patch_embed":
            units.append(Unit("_pos_embed", model._pos_embed, getattr(model, "pos_drop", None)))
    return units


def random_or_batch_dependent(module: nn.Module, skip: tuple[str, ...] = ()) -> str | None:
    """Why ``module`` (in training mode) would not map an input to the same output every step: a dropout
    of any kind (torch's ``p``, timm's ``drop_prob`` / ``prob``) above 0, or a BatchNorm without
    parameters (``freeze_mode`` cannot tell it is frozen, so it normalizes with batch statistics).
    Submodules whose names start with one of ``skip`` are not looked at."""
    for name, m in module.named_modules():
        if skip and f"{name}.".startswith(skip):
            continue
        kind = type(m).__name__
        rates = [getattr(m, a, None) for a in ("p", "drop_prob", "prob")]
        rate = next((r for r in rates if isinstance(r, int | float) and not isinstance(r, bool)), 0)
        if "drop" in kind.lower() and rate > 0:
            return f"{kind} (rate {rate}) at {name or 'its top'} is random in training"
        if isinstance(m, nn.modules.batchnorm._NormBase) and not list(m.parameters(recurse=False)):
            return f"{kind} at {name or 'its top'} has no parameters and would use batch statistics"
    return None


def split_tower(
    model: nn.Module, learnable: set[str], image_size: int, forward_features: Callable | None = None
) -> TowerSplit | str:
    """The tower ``model`` (a timm model) cut before its first unit with a parameter in ``learnable``
    (names relative to ``model``), or the reason it cannot be.

    Args:
        model: the timm model.
        learnable: the names of ``model``'s parameters that learn.
        image_size: the square input side (for the dry run that checks the cut).
        forward_features: what the trunk must reproduce (default ``model.forward_features``).
    """
    units = trunk(model)
    params = dict(model.named_parameters())
    unit_of: dict[str, int] = {}
    for i, unit in enumerate(units):
        if unit.module is not None and unit.name != "_pos_embed":
            for n, _ in unit.module.named_parameters():
                unit_of[f"{unit.name}.{n}"] = i
    outside = sorted(n for n in learnable if n not in unit_of and n in params)
    cut = min((unit_of[n] for n in learnable if n in unit_of), default=len(units))
    if cut == 0:
        return f"its first module ({units[0].name}) learns: there is no frozen prefix"
    suffix_names = {units[i].name for i in range(cut, len(units))}
    head = tuple(f"{n}." for n in HEAD_CHILDREN)
    stem_learnable = [n for n in outside if not n.startswith(head)]
    if stem_learnable:
        return f"{stem_learnable[0]} learns but is not in a block after the cut"
    for unit in units[:cut]:
        reason = unit.module is not None and random_or_batch_dependent(unit.module)
        if reason:
            return f"the prefix is not the same every step: {reason}"
    split = TowerSplit(
        units[:cut],
        units[cut:],
        [
            n
            for n in model.state_dict()
            if not n.startswith(head) and not any(n.startswith(f"{s}.") for s in suffix_names)
        ],
    )
    problem = _check(model, split, image_size, forward_features or model.forward_features)
    return problem or split


@torch.no_grad()
def _check(model: nn.Module, split: TowerSplit, image_size: int, forward_features: Callable) -> str | None:
    """None when prefix then suffix computes ``forward_features`` on a random input (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        x = x.to(device)
        expected = forward_features(x)
        try:
            middle = split.prefix(x)
            got = split.suffix(middle)
        except Exception as err:  # a trunk that is not a plain sequence fails in a shape or type
            return f"its modules do not run as a plain sequence ({type(err).__name__}: {err})"
        split.prefix_shape = tuple(middle.shape[1:])
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
            return "its modules run in sequence do not compute its forward_features"
    finally:
        model.train(was_training)
    return None
