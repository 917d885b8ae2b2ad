"""Run on N processes: each rank computes the contrastive loss on its share of one global batch (the
shares may differ in size), with embeddings gathered across ranks. Rank 0 writes, per rank, the loss and
the gradients of that rank's embeddings and of the logit scale to the JSON file given as argv[1].
With a second argument ``ids``, rows carry image ids with repeats within and across ranks (IDS), and the
loss is the multi-positive one.
"""

import sys

import torch
from accelerate import Accelerator
from ranks_io import write_records

from vlfuse.tasks.retrieval import contrastive_loss

SIZES = [3, 5]  # rows per rank (ranks beyond these get 2)
IDS = [0, 1, 0, 2, 3, 1, 4, 0]  # image 0 three times (both ranks), image 1 twice (both ranks)


def main(out: str, with_ids: bool) -> None:
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    sizes = [SIZES[r] if r < len(SIZES) else 2 for r in range(world)]
    generator = torch.Generator().manual_seed(0)
    total = sum(sizes)
    images = torch.nn.functional.normalize(torch.randn(total, 16, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(total, 16, generator=generator), dim=-1)
    start = sum(sizes[:rank])
    local_images = images[start : start + sizes[rank]].clone().requires_grad_(True)
    local_texts = texts[start : start + sizes[rank]].clone().requires_grad_(True)
    log_scale = torch.tensor(2.5, requires_grad=True)
    ids = torch.tensor(IDS[start : start + sizes[rank]]) if with_ids else None
    loss, _ = contrastive_loss(local_images, local_texts, log_scale.exp(), ids)
    loss.backward()
    record = {
        "rank": rank,
        "world": world,
        "sizes": sizes,
        "loss": loss.item(),
        "grad_images": local_images.grad.tolist(),
        "grad_texts": local_texts.grad.tolist(),
        "grad_log_scale": log_scale.grad.item(),
    }
    write_records(accelerator, record, out)


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "ids")
