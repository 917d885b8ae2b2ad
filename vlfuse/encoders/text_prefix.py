"""A text tower cut where its trainable layers start: the frozen prefix (cached per text) and the rest.

When a transformers text tower trains only its last layers (``tuning: last_blocks``, or LoRA with
``lora.last_blocks``), its embeddings and earlier layers map a text to the same hidden states every step,
provided nothing in them is random in training. ``split_text_tower`` cuts the layer stack before its
first learnable layer; the prefix is the hidden state entering that layer.

transformers' encoders share no call that runs a layer stack from a given hidden state (each builds its
own attention mask, position embeddings and layer arguments in its ``forward``), so both halves run
through the model's own ``forward``, steered: ``prefix`` stops it when the first learnable layer is called
(a pre-hook captures its input); ``suffix`` replaces the earlier layers' ``forward`` for the call, each
passing its input on and the last of them returning the cached hidden state, so the first learnable layer
receives it as its input (which activation checkpointing stores and recomputes from), and the rest runs as
usual (the embeddings still run on placeholder ids: a lookup and a norm, their output unused). The mask
and every other argument the layers get are the model's own. A dry run checks that prefix then suffix
computes the model's output on texts of different lengths; any model for which it does not is not cut.

A tower cannot be cut (``split_text_tower`` returns the reason, and the run computes the whole tower as
before) when a learnable parameter sits before the cut, when the prefix is random in training (a
dropout above 0: BERT-family configs set 0.1, and a frozen layer keeps its dropout active in training;
``model.text_encoder.config_overrides`` can set it to 0), or when the dry run disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlfuse.encoders.prefix import random_or_batch_dependent


class _Stop(Exception):
    """Ends a forward pass once the first learnable layer's input is captured."""


@dataclass
class TextSplit:
    """A text model's layer stack ``stack_name`` cut before layer ``cut``."""

    stack_name: str  # e.g. encoder.layer (relative to the transformers model)
    cut: int
    prefix_state: list[str]  # the text model's state names the prefix reads (its cache key)
    tuple_arity: int = 0  # what a layer returns: 0 a tensor, n a tuple of n (set by the dry run)

    @property
    def boundary(self) -> str:
        """The first layer the suffix runs (where the cached hidden state enters)."""
        return f"{self.stack_name}.{self.cut}"

    def prefix(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state entering layer ``cut`` (``[B, T, D]``)."""
        captured: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = model.get_submodule(self.stack_name)[self.cut].register_forward_pre_hook(
            grab, with_kwargs=True
        )
        try:
            model(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the text model's forward never called {self.boundary}")
        return captured[0]

    def suffix(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's ``last_hidden_state`` from the hidden state entering layer ``cut``."""
        stack = model.get_submodule(self.stack_name)
        arity = self.tuple_arity

        def pass_through(out: torch.Tensor | None):
            def forward(*args, **kwargs):
                h = out if out is not None else (args[0] if args else kwargs["hidden_states"])
                return (h, *([None] * (arity - 1))) if arity else h

            return forward

        # The layers before the cut pass their input on, the last of them the cached hidden state: layer
        # ``cut`` receives it as its input (also what activation checkpointing stores and recomputes from).
        skipped = list(stack[: self.cut])
        for i, layer in enumerate(skipped):
            layer.forward = pass_through(hidden if i == self.cut - 1 else None)  # shadows the class's
        try:
            ids = torch.zeros(attention_mask.shape, dtype=torch.long, device=hidden.device)
            return model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for layer in skipped:
                del layer.forward


def split_text_tower(
    model: nn.Module, stack_name: str, blocks: list[list[str]], learnable: set[str], tokenizer
) -> TextSplit | str:
    """The text model ``model`` (transformers) cut before its first layer with a learnable parameter, or
    the reason it cannot be.

    Args:
        model: the transformers model.
        stack_name: its layer stack (``nn.ModuleList``), relative to ``model``.
        blocks: its parameter names (relative to ``model``) in blocks: embeddings first, then one list per
            layer (a norm after the stack goes with the last layer).
        learnable: the names of ``model``'s parameters that learn.
        tokenizer: for the dry run.
    """
    learns = [i for i, block in enumerate(blocks) if any(n in learnable for n in block)]
    if not learns:
        return "nothing in it learns"
    if learns[0] == 0:
        return "its embeddings learn: there is no frozen prefix"
    cut = learns[0] - 1
    if cut == 0:
        return f"its first layer ({stack_name}.0) learns: there is no frozen prefix"
    suffix_modules = tuple(f"{stack_name}.{i}." for i in range(cut, len(blocks) - 1))
    # what runs after the stack is looked at too: a dropout there keeps the cut from being made (rare)
    reason = random_or_batch_dependent(model, skip=suffix_modules)
    if reason:
        return f"the prefix is not the same every step: {reason}"
    suffix_params = {n for block in blocks[cut + 1 :] for n in block}
    split = TextSplit(
        stack_name,
        cut,
        [n for n in model.state_dict() if not n.startswith(suffix_modules) and n not in suffix_params],
    )
    return _check(model, split, tokenizer) or split


@torch.no_grad()
def _check(model: nn.Module, split: TextSplit, tokenizer) -> str | None:
    """None when prefix then suffix computes the model's output on two texts of different lengths (eval
    mode, the padding's positions left out); sets ``split.tuple_arity``."""
    was_training = model.training
    model.eval()
    outputs: list = []
    stack = model.get_submodule(split.stack_name)
    handle = stack[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        enc = tokenizer(
            ["a photo of a small red cat on a mat", "two dogs"], padding=True, return_tensors="pt"
        )
        device = next(model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        handle.remove()
        out = outputs[0]
        split.tuple_arity = len(out) if isinstance(out, tuple) else 0
        try:
            got = split.suffix(model, split.prefix(model, ids, mask), mask)
        except Exception as err:  # a model whose forward does not go through its stack as assumed
            return f"its forward cannot be resumed at {split.boundary} ({type(err).__name__}: {err})"
        keep = mask.bool()
        if got.shape != expected.shape or not torch.allclose(got[keep], expected[keep], rtol=1e-5, atol=1e-5):
            return f"its forward resumed at {split.boundary} does not compute its output"
    finally:
        handle.remove()
        model.train(was_training)
    return None
