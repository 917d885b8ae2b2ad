"""How a trainable tower learns: every weight (``full``), low-rank adapters (``lora``, through peft) or
its last blocks only (``last_blocks``).

Both towers describe themselves the same way, so one set of rules serves both: ``blocks()`` lists the
tower's parameter names in blocks, first the stem/embeddings (never trained by ``last_blocks``), then one
list per block (a final norm goes with the last block); ``lora_targets()`` names the modules LoRA adapts
by default. ``learnable_names`` says which parameters learn; ``freeze_mode`` keeps every module whose
own parameters are all frozen in eval mode (BatchNorm statistics of a frozen stem never move).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from vlfuse.encoders.fast import use_fast_lora
from vlfuse.schema import ConfigError, LoraSettings

LORA_MARK = "lora_"
# Attention projections LoRA adapts by default (transformers' BERT/RoBERTa, CLIP/SigLIP, T5; timm ViTs).
ATTENTION_PROJECTIONS = ("qkv", "query", "key", "value", "q_proj", "k_proj", "v_proj", "q", "k", "v")


class TunableTower:
    """What both towers share about how they learn: mixed into an ``nn.Module`` that sets ``KEY`` (its
    config section), holds ``cfg`` (with ``tuning``, ``lora``, ``last_blocks``) and ``model``, and
    implements ``blocks()``."""

    KEY: str
    cfg: Any
    model: nn.Module

    def blocks(self) -> list[list[str]]:
        """Parameter names in blocks: the stem / embeddings first, then one list per block."""
        raise NotImplementedError

    @property
    def has_adapters(self) -> bool:
        return any(LORA_MARK in n for n, _ in self.named_parameters())

    def add_adapters(self) -> None:
        """LoRA adapters on ``cfg.lora``'s targets (default: the attention q/k/v projections; a CNN's
        convolutions), in every block or, with ``lora.last_blocks``, in the last ones only."""
        within = None
        if self.cfg.lora.last_blocks is not None:
            top = last_blocks_of(self.blocks(), self.cfg.lora.last_blocks, f"{self.KEY}.lora")
            within = {n.removeprefix("model.").rpartition(".")[0] for n in top}
        add_lora(self.model, self.cfg.lora, self.KEY, within)

    def cut(self, learnable: set[str]) -> Any:
        """The tower cut before the first of ``learnable`` (names relative to ``model``), or why not."""
        raise NotImplementedError

    def split(self) -> Any:
        """The tower cut before its first learnable block (``cut``) for the parameters that learn now, or
        why it cannot be: kept until what learns changes."""
        learnable = frozenset(n[len("model.") :] for n, p in self.named_parameters() if p.requires_grad)
        cached = getattr(self, "_split", None)
        if cached is None or cached[0] != learnable:
            self._split = (learnable, self.cut(set(learnable)))
        return self._split[1]

    def _require_split(self) -> Any:
        split = self.split()
        if isinstance(split, str):
            raise ValueError(f"{self.KEY}: the tower cannot be cut before its learnable blocks: {split}")
        return split

    def learnable_parameter_names(self) -> set[str]:
        """The parameters that learn when this tower is trainable, as ``cfg.tuning`` says."""
        names = [n for n, _ in self.named_parameters()]
        blocks = self.blocks() if self.cfg.tuning == "last_blocks" else []
        return learnable_names(self.cfg.tuning, names, blocks, self.cfg.last_blocks, self.KEY)


def default_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the modules LoRA adapts when ``lora.target_modules`` is empty: the attention q/k/v
    projections (``nn.Linear``) where the model has them, else its ungrouped, undilated convolutions (a
    CNN)."""
    linear = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
    ]
    if linear:
        return linear
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and not _dilated(m)
    ]


def _dilated(module: nn.Module) -> bool:
    """A dilated convolution (e.g. timm's ``output_stride`` < 32): peft's convolution adapter ignores the
    dilation, so its update would not have the layer's output shape."""
    return isinstance(module, nn.Conv2d) and tuple(module.dilation) != (1, 1)


def add_lora(model: nn.Module, settings: LoraSettings, key: str, within: set[str] | None = None) -> int:
    """Injects LoRA adapters into ``model`` in place (peft; the base weights are untouched and the update
    starts at zero, so the outputs do not change).

    Args:
        key: the config section, for messages (``model.image_encoder``).
        within: only modules of these names (``lora.last_blocks``: the last blocks' modules) are adapted.

    Returns:
        The number of adapted modules.

    Raises:
        ConfigError: if the target modules match nothing, naming the key.
    """
    targets = list(settings.target_modules) or default_lora_targets(model)
    if not targets:
        raise ConfigError(f"{key}.lora.target_modules: found no module to adapt; name them explicitly")
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ConfigError(
            f"{key}.lora.target_modules: {unmatched} match no module of the tower (names are module names "
            f"or their last parts, e.g. {_examples(model)})"
        )
    if within is not None:  # the targets' full names inside the last blocks (peft matches full names)
        targets = [n for n in names if n in within and any(n == t or n.endswith("." + t) for t in targets)]
        if not targets:
            raise ConfigError(
                f"{key}.lora.last_blocks={settings.last_blocks}: no target module "
                f"({list(settings.target_modules) or 'the default ones'}) is in the last blocks"
            )
    dilated = [
        n
        for n, m in model.named_modules()
        if _dilated(m) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    if dilated:
        raise ConfigError(
            f"{key}.lora.target_modules: {dilated[:3]} are dilated convolutions, which peft's LoRA cannot "
            "adapt (its update ignores the dilation); leave them out, or drop the encoder's output_stride"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
    )
    try:
        with warnings.catch_warnings():  # peft warns of an unmergeable layer; check_mergeable says which
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(config, model)
    except ValueError as err:  # peft refuses a module type it cannot adapt
        raise ConfigError(f"{key}.lora.target_modules: {err}") from None
    check_mergeable(model, key)
    use_fast_lora(model)  # the same adapters, computed with fewer passes over the activations
    return sum(1 for _, m in model.named_modules() if isinstance(m, LoraLayer))


def check_mergeable(model: nn.Module, key: str) -> None:
    """Refuses, at start-up, an adapted layer that peft cannot merge into its weights (a saved model holds
    merged weights): each LoRA layer's copy is merged once with a non-zero update.

    Raises:
        ConfigError: naming the module and peft's reason (e.g. a grouped convolution).
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        trial = copy.deepcopy(layer)
        with torch.no_grad():
            for p in trial.parameters():
                if p.is_floating_point():
                    p.normal_(0, 0.01)  # an update as after training
        try:
            trial.merge(safe_merge=True)
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
            raise ConfigError(
                f"{key}.lora.target_modules: module {name!r} ({type(layer.get_base_layer()).__name__}) "
                f"cannot be merged into the saved weights by peft ({err}); leave it out of the targets"
            ) from None


def _examples(model: nn.Module) -> list[str]:
    leaves = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return sorted({n.rsplit(".", 1)[-1] for n in leaves})[:8]


def learnable_names(
    tuning: str, names: list[str], blocks: list[list[str]], last_blocks: int, key: str
) -> set[str]:
    """The parameter names that learn when the tower is trainable.

    Args:
        tuning: ``full``, ``lora`` or ``last_blocks``.
        names: all of the tower's parameter names.
        blocks: the tower's blocks (``blocks()``): stem first, then one list per block.
        last_blocks: for ``last_blocks``, how many learn.
        key: the config section, for messages.
    """
    if tuning == "full":
        return set(names)
    if tuning == "lora":
        return {n for n in names if LORA_MARK in n}
    return set(last_blocks_of(blocks, last_blocks, key))


def last_blocks_of(blocks: list[list[str]], last_blocks: int, key: str) -> list[str]:
    """The parameter names of the last ``last_blocks`` blocks (``blocks``: stem first, then each block).

    Raises:
        ConfigError: more blocks asked for than the tower has, naming ``key``.
    """
    available = len(blocks) - 1
    if last_blocks > available:
        raise ConfigError(
            f"{key}.last_blocks={last_blocks}, but the tower has {available} blocks; use 1 to {available}"
        )
    return [n for block in blocks[-last_blocks:] for n in block]


def blocks_by_prefix(names: Iterable[str], stack: str, size: int) -> list[list[str]]:
    """Parameter names in blocks for a model whose blocks are ``<stack>.<i>.``: the parameters before the
    stack are the stem, the ones after it go with the last block."""
    pattern = re.compile(re.escape(stack) + r"\.(\d+)\.")
    blocks: list[list[str]] = [[] for _ in range(size + 1)]
    seen_stack = False
    for name in names:
        match = pattern.match(name)
        if match:
            seen_stack = True
            blocks[int(match.group(1)) + 1].append(name)
        else:
            blocks[size if seen_stack else 0].append(name)
    return blocks


def freeze_mode(module: nn.Module) -> None:
    """Puts every submodule whose own parameters are all frozen in eval mode (not recursively: a frozen
    norm inside a trainable block is frozen, the block's other layers are not)."""
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            m.training = False
