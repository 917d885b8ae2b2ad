"""Faster forms of two layers a partly frozen tower is full of, with the same parameters and state-dict
names (the module's class is switched in place, so optimizers, hooks and saved weights are unaffected):

- ``FrozenBatchNorm2d``: a BatchNorm whose statistics and affine weights are all frozen (eval mode, no
  gradient) computes ``x * scale + shift`` with the two per-channel vectors folded from its state. Its
  backward is one multiplication; torch's eval-mode batch-norm backward on the CPU took about 10 ms per
  layer of a ResNet-50 at batch 16 (two-thirds of LoRA's extra cost over its convolutions). In training
  mode, or with a trainable weight, it is an ordinary BatchNorm. ``FrozenBatchNormAct2d`` does the same
  for timm's ``BatchNormAct2d`` (MobileNet, EfficientNet...: the norm, then its drop and activation
  layers, as timm's forward).
- ``FastLoraLinear`` / ``FastLoraConv2d``: peft's LoRA layers with one active adapter, no dropout and no
  variant (DoRA...) compute ``base(x) + B(A(x)) * scaling`` with the scaling folded into ``B``'s weight
  (a weight-sized product instead of an activation-sized one, forward and backward) and the sum fused:
  ``addmm`` into the base output for a linear layer, an in-place add for a convolution. In eval mode
  without gradient (evaluation) they run the base layer once with the merged weight ``W + delta``
  (peft's ``get_delta_weight``, the arithmetic of its merge; the module's own weights are not touched):
  one product instead of three. Any other case (and a weight DeepSpeed ZeRO-3 partitions) runs peft's
  own forward.

Both are checked against the layers they replace in ``tests/test_prefix_cache.py`` (outputs and
gradients within 1e-5), which also fails if peft's LoRA layers lose the attributes used here
(``lora_A``, ``lora_B``, ``scaling``, ``lora_dropout``, ``lora_variant``, ``active_adapters``,
``merged``, ``disable_adapters``: public attributes of ``peft.tuners.lora.LoraLayer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from timm.layers import BatchNormAct2d
from torch import nn


def _frozen_affine(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor | None:
    """``bn(x)`` as ``x * scale + shift`` when ``bn`` is frozen (eval mode, running statistics, affine
    weights without gradient) and ``x`` is 4-D; None otherwise (the caller runs the batch norm)."""
    frozen = bn.affine and not (bn.weight.requires_grad or bn.bias.requires_grad)
    if bn.training or not frozen or bn.running_var is None or x.dim() != 4:
        return None
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, frozen and in eval mode, runs as a per-channel affine map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _frozen_affine(self, x)
        return super().forward(x) if y is None else y


class FrozenBatchNormAct2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` that, frozen and in eval mode, runs its norm as a per-channel affine map
    (then its drop and activation layers, as timm's forward does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _frozen_affine(self, x)
        return super().forward(x) if y is None else self.act(self.drop(y))


SWAPS = {nn.BatchNorm2d: FrozenBatchNorm2d, BatchNormAct2d: FrozenBatchNormAct2d}


def frozen_batchnorm_as_affine(module: nn.Module) -> int:
    """Switches every ``nn.BatchNorm2d`` and timm ``BatchNormAct2d`` of ``module`` (those exact classes;
    other subclasses are left alone) to its frozen form above; returns how many."""
    count = 0
    for m in module.modules():
        if type(m) in SWAPS:
            m.__class__ = SWAPS[type(m)]
            count += 1
    return count


def _plain_adapter(layer: lora_layer.LoraLayer, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when the fast path applies (no extra arguments, not merged or disabled, no
    dropout, no variant, ``B`` without a bias); None otherwise."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None:
        return None
    weights = (layer.get_base_layer().weight, layer.lora_A[name].weight, layer.lora_B[name].weight)
    if any(hasattr(w, "ds_id") for w in weights):
        # DeepSpeed ZeRO-3 gathers a partitioned weight only when its own module runs, and the fast path
        # reads the adapter's and base layer's weights directly: peft's forward calls each module
        return None
    return name


def _merged_weight(layer: lora_layer.LoraLayer, name: str) -> torch.Tensor | None:
    """The base weight with the adapter merged in, for a forward that needs no gradient (eval mode, grad
    off: the merged weight costs a weight-sized product, the adapter's two products cost activation-sized
    ones); None when a gradient may be needed."""
    if layer.training or torch.is_grad_enabled():
        return None
    weight = layer.get_base_layer().weight
    return weight + layer.get_delta_weight(name).to(weight.dtype)


class FastLoraLinear(lora_layer.Linear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _plain_adapter(self, args, kwargs)
        if name is None or self.fan_in_fan_out:
            return super().forward(x, *args, **kwargs)
        if (merged := _merged_weight(self, name)) is not None:
            return F.linear(x, merged, self.base_layer.bias)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        h = lora_a(x.to(lora_a.weight.dtype))
        flat = result.reshape(-1, result.shape[-1])
        update = (lora_b.weight * self.scaling[name]).t().to(flat.dtype)
        return torch.addmm(flat, h.reshape(-1, h.shape[-1]).to(flat.dtype), update).view_as(result)


class FastLoraConv2d(lora_layer.Conv2d):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _plain_adapter(self, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        if base.padding_mode == "zeros" and (merged := _merged_weight(self, name)) is not None:
            return F.conv2d(x, merged, base.bias, base.stride, base.padding, base.dilation, base.groups)
        result = base(x)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        h = lora_a(x.to(lora_a.weight.dtype))
        weight = (lora_b.weight * self.scaling[name]).to(h.dtype)
        update = F.conv2d(h, weight, None, lora_b.stride, lora_b.padding, lora_b.dilation, lora_b.groups)
        return result.add_(update.to(result.dtype))  # the convolution's backward needs not its output


FAST_LORA = {lora_layer.Linear: FastLoraLinear, lora_layer.Conv2d: FastLoraConv2d}


def use_fast_lora(module: nn.Module) -> int:
    """Switches peft's LoRA ``Linear`` and ``Conv2d`` layers of ``module`` to their fast forms; returns how
    many."""
    count = 0
    for m in module.modules():
        fast = FAST_LORA.get(type(m))
        if fast is not None:
            m.__class__ = fast
            count += 1
    return count
