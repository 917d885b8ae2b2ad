"""Run on N processes (or imported by the tests for the one-process side): each rank takes its share of
one global retrieval batch and computes one step's gradient two ways: with gradient caching (chunks of
CHUNK, no graph kept across chunks) and by the reference (every chunk run with its graph, the loss over
the gathered batch, one backward). Rank 0 writes, per rank, the loss and every parameter's gradient of
both to the JSON file given as argv[1]; a second argument ``nodropout`` turns dropout off.
"""

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

from vlfuse.config import load_config
from vlfuse.model import VLFuseModel
from vlfuse.tasks import get_task
from vlfuse.training.grad_cache import cached_backward, chunks_of

GLOBAL = 8  # examples in the global batch
CHUNK = 3  # a rank's 4 examples -> chunks of 3 and 1; one process's 8 -> 3, 3, 2
IDS = [0, 1, 0, 2, 3, 1, 4, 0]  # repeated images within and across ranks (multi-positive loss)
TEXTS = ["a red circle", "a blue square", "green triangle", "the big red one", "a small square"]


def build(dropout: bool, *extra: str):
    """The tiny retrieval model (a ViT: no batch norm, so rows are independent) and the global batch;
    ``extra``: more overrides (e.g. LoRA on both towers)."""
    p = 0.2 if dropout else 0.0
    cfg = load_config(
        overrides=[
            "model.task=retrieval",
            "model.fusion.name=projection",
            "model.fusion.dim=16",
            f"model.fusion.dropout={p}",
            "model.image_encoder.name=test_vit",
            "model.image_encoder.pretrained=false",
            "model.image_encoder.image_size=32",
            f"model.image_encoder.kwargs={{drop_rate: {p}}}",
            "model.text_encoder.name=vlfuse:tiny-bert",
            "model.text_encoder.pretrained=false",
            "model.text_encoder.max_length=8",
            "model.trainable_encoders=all",
            *extra,
        ]
    )
    torch.manual_seed(0)
    model = VLFuseModel(cfg.model)
    if not dropout:  # BERT's own dropout too
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    generator = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(GLOBAL, 3, 32, 32, generator=generator),
        **model.text_encoder.tokenize([TEXTS[i % len(TEXTS)] for i in range(GLOBAL)]),
        "image_ids": torch.tensor(IDS),
        "valid": torch.ones(GLOBAL, dtype=torch.bool),
    }
    return model, batch


def reference_backward(accelerator, model, loss_fn, batch, chunk_size):
    """The full-batch computation: every chunk with its graph (the same random draws, chunk by chunk),
    the loss over the gathered batch, one backward; on several processes the gradient averaged over them
    by hand, as DDP would (DDP itself refuses a parameter used by several forward passes of one
    backward)."""
    with accelerator.no_sync(model):
        outputs = [model(**chunk) for chunk in chunks_of(batch, chunk_size)]
        joined = {k: torch.cat([o[k] for o in outputs]) for k in ("image_embeds", "text_embeds")}
        loss, _ = loss_fn({**joined, "logit_scale": outputs[0]["logit_scale"]}, batch)
        accelerator.backward(loss)
    if accelerator.num_processes > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= accelerator.num_processes
    return loss.detach()


def gradients(model) -> dict[str, list]:
    grads = {n: p.grad.flatten().tolist() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def main(out: str, dropout: bool) -> None:
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    model, batch = build(dropout)
    share = GLOBAL // world
    local = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
    task = get_task("retrieval")
    prepared = accelerator.prepare(model)
    prepared.train()
    torch.manual_seed(10 + rank)
    cached_loss = cached_backward(accelerator, prepared, task.loss, local, CHUNK)
    after_cached = torch.rand(1).item()
    cached = gradients(model)
    torch.manual_seed(10 + rank)
    reference_loss = reference_backward(accelerator, prepared, task.loss, local, CHUNK)
    after_reference = torch.rand(1).item()
    record = {
        "rank": rank,
        "cached_loss": cached_loss.item(),
        "reference_loss": reference_loss.item(),
        "cached": cached,
        "reference": gradients(model),
        "rng_after_equal": after_cached == after_reference,
    }
    from ranks_io import write_records  # here: the tests import this file for build() alone

    write_records(accelerator, record, out)


if __name__ == "__main__":
    main(sys.argv[1], not (len(sys.argv) > 2 and sys.argv[2] == "nodropout"))
