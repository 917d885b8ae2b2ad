"""Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", 2021): the exact gradient of a loss over the whole batch at the activation memory of one chunk
(``train.contrastive_chunk_size``).

A contrastive loss couples every example of the (gathered) batch, so gradient accumulation over
micro-batches would change it: each micro-batch would see only its own negatives. Instead, one step

1. runs the model on each chunk of the batch *without* a graph and keeps only its outputs (the
   embeddings: a few KiB per example);
2. computes the task's loss over all of them (gathered across processes as usual) and its gradient with
   respect to those outputs;
3. runs each chunk again *with* a graph and back-propagates the cached output gradient
   (``sum(output * gradient)`` has exactly that gradient), one chunk's activations at a time.

Randomness replays: each chunk's second pass starts from the random state its first pass started from,
so dropout draws the same masks. Buffers a forward pass updates (batch norm's running statistics) are
restored after the first pass, so each chunk updates them once. The gradient is all-reduced once, after
the last chunk (DDP's ``no_sync`` before it); FSDP reduces each chunk's, the same sum. What stays
approximate is what is per chunk by nature: batch norm normalises each chunk with that chunk's
statistics, as DDP does per process. DeepSpeed is refused (its engine steps at every backward). A frozen
tower runs once per step: its features stand in for its inputs in both passes (``encode_frozen_towers``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

Batch = dict[str, torch.Tensor]


def chunks_of(batch: Batch, size: int) -> list[Batch]:
    """``batch`` cut into chunks of ``size`` examples along the first dimension (the last may be
    smaller); every tensor of a training batch has one row per example."""
    n = batch["valid"].shape[0]
    return [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, n, size)]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state dropout draws from: the CPU generator's and the accelerator's (if any)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state[device.type] = torch.get_device_module(device.type).get_rng_state(device)
    return state


def set_rng_state(device: torch.device, state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(state[device.type], device)


def per_example(value: torch.Tensor, rows: int) -> bool:
    """Whether an output has one row per example of a chunk (embeddings), rather than one value for
    the whole batch (the temperature)."""
    return value.dim() >= 1 and value.shape[0] == rows


def leaf_outputs(chunk_outputs: list[Batch], chunks: list[Batch]) -> tuple[Batch, set[str]]:
    """The chunks' floating-point outputs joined into the whole batch's, as leaves that collect the
    loss's gradient (per-example outputs concatenated, batch-wide ones taken from the first chunk), and
    the names of the per-example ones."""
    joined: Batch = {}
    rows_of = set()
    for key, first in chunk_outputs[0].items():
        if not torch.is_floating_point(first):
            continue
        if per_example(first, chunks[0]["valid"].shape[0]):
            rows_of.add(key)
            value = torch.cat([out[key] for out in chunk_outputs])
        else:
            value = first
        joined[key] = value.detach().requires_grad_(True)
    return joined, rows_of


def encode_frozen_towers(accelerator: Accelerator, model: torch.nn.Module, chunk: Batch) -> Batch:
    """``chunk`` with a frozen tower's features in place of its raw inputs, so that the tower runs once
    per step rather than in both passes (its output is the same in both: eval mode, no graph). Towers
    the feature cache serves have features already; a sharded model (FSDP) runs its towers itself."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return chunk
    inner = accelerator.unwrap_model(model)
    out = dict(chunk)
    with torch.no_grad(), accelerator.autocast():
        if "pixel_values" in out and not inner.tower_is_trainable("image"):
            image = inner.encode_image(out.pop("pixel_values"))
            out.update(image_tokens=image.tokens, image_pooled=image.pooled)
        if "input_ids" in out and not inner.tower_is_trainable("text"):
            text = inner.encode_text(out.pop("input_ids"), out.pop("attention_mask"))
            out.update(text_tokens=text.tokens, text_mask=text.mask, text_pooled=text.pooled)
    keep_tokens = inner.fusion.uses_tokens  # else only pooled vectors are read: hold no token maps
    return {k: v for k, v in out.items() if v is not None and (keep_tokens or not k.endswith("_tokens"))}


def cached_backward(
    accelerator: Accelerator, model: torch.nn.Module, loss_fn, batch: Batch, chunk_size: int
) -> torch.Tensor:
    """One training micro-step with gradient caching: the loss over the whole ``batch`` (returned,
    detached) and its gradient accumulated into the parameters, ``chunk_size`` examples of activations
    at a time.

    Args:
        accelerator: the run's (``backward`` applies gradient accumulation's scaling and fp16's scaler).
        model: the prepared model.
        loss_fn: ``(outputs, batch) -> (loss, parts)``, the task's loss.
        batch: the training batch on the device (``bad_rows`` already taken out).
        chunk_size: examples per chunk.
    """
    chunks = [encode_frozen_towers(accelerator, model, chunk) for chunk in chunks_of(batch, chunk_size)]
    device = batch["valid"].device
    starts, outputs = [], []
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.no_grad():
        for chunk in chunks:
            starts.append(rng_state(device))
            outputs.append(model(**chunk))
    for live, saved in buffers:  # the second pass updates running statistics, once per chunk
        live.copy_(saved)
    after = rng_state(device)
    leaves, rows_of = leaf_outputs(outputs, chunks)
    loss, _ = loss_fn(leaves, batch)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    cached = {key: g for key, g in zip(leaves, grads) if g is not None}
    offset = 0
    for k, chunk in enumerate(chunks):
        rows, last = chunk["valid"].shape[0], k == len(chunks) - 1
        set_rng_state(device, starts[k])
        # DDP all-reduces once, after the last chunk, which must reach every parameter: it also carries
        # the gradient of the batch-wide outputs (back-propagated once).
        with nullcontext() if last else accelerator.no_sync(model):
            out = model(**chunk)
            parts = [
                (out[key] * grad[offset : offset + rows]).sum() if key in rows_of else (out[key] * grad).sum()
                for key, grad in cached.items()
                if key in rows_of or last
            ]
            accelerator.backward(sum(parts[1:], parts[0]))
        offset += rows
    set_rng_state(device, after)
    return loss.detach()
