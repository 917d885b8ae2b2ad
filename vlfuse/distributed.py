"""What works around or extends the launcher (Accelerate, torch.distributed), in one place.

- FSDP on CPU processes: Accelerate turns an FSDP launch into DDP on the CPU; ``use_fsdp_on_cpu_processes``
  switches its state to FSDP (private: ``PartialState._shared_state``).
- ``broadcast_training_buffers``: FSDP shards parameters, not buffers (BatchNorm statistics); DDP's habit of
  broadcasting process 0's buffers is reproduced.
- ``ignore_in_ddp``: towers that stay on the CPU are left out of DDP's broadcast (private:
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``).
- ``process_state``: Accelerate's ``PartialState`` as its ``Accelerator`` would build it (Accelerate 1.16's
  ``PartialState()`` ignores ``ACCELERATE_USE_CPU`` and, made first, leaves CPU ranks each alone).
- ``gather_with_grad`` / ``gather_ids`` / ``gather_rows``: every process's rows, uneven sizes allowed, with
  gradients (the contrastive loss's global batch) or without (retrieval evaluation's distinct inputs).

Each private name is said beside its use, and ``tests/test_distributed.py`` fails if it disappears.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from torch.nn.parallel import DistributedDataParallel

from vlfuse.schema import ConfigError


def process_state() -> PartialState:
    """The launch's process state (rank, world size), the same an ``Accelerator`` made later gets.

    ``Accelerator`` and ``AcceleratorState`` read ``ACCELERATE_USE_CPU``; Accelerate 1.16's ``PartialState()``
    does not, and the first state made is shared by all later ones: made first on CPU ranks of a
    ``use_cpu`` launch it would record one process each, and every later ``Accelerator`` with it.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def use_fsdp_on_cpu_processes(accelerator: Accelerator) -> None:
    """Makes an FSDP launch config shard when the processes run on the CPU.

    Accelerate 1.15 turns a launch with ``distributed_type: FSDP`` into FSDP only for GPU-like devices; on
    CPU processes (``use_cpu: true`` / ``ACCELERATE_USE_CPU=1``) its state stays ``MULTI_CPU`` and
    ``prepare`` wraps the model in DDP: every process would hold the whole model, gradients and optimizer
    state. PyTorch's FSDP2 (``fully_shard``) runs on gloo CPU processes, so here the state is switched to
    FSDP with the plugin the launcher described (its ``FSDP_*`` variables), as Accelerate does on GPUs.

    Raises:
        ConfigError: an FSDP1 config on CPU processes (use ``fsdp_version: 2``).
    """
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's environment
    if plugin.fsdp_version != 2:
        raise ConfigError(
            "FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
            "(recipes/configs/accelerate/cpu_2proc_fsdp.yaml)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # Private: Accelerate's shared state dict (PartialState keeps the type there, apart from the instance).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.print("FSDP2 on CPU processes: parameters, gradients and optimizer state are sharded (gloo)")


@torch.no_grad()
def broadcast_training_buffers(model: torch.nn.Module) -> None:
    """Copies process 0's buffers of the modules in training mode (BatchNorm statistics) to every process,
    as DDP does before each forward; under FSDP the loop calls it before each forward and before each
    checkpoint. FSDP shards parameters, not buffers, and would let each process keep statistics of its
    own batches, of which a checkpoint saves one copy (from any process) and ``final/`` process 0's: a
    resumed run would then differ from an uninterrupted one."""
    buffers = [b for m in model.modules() if m.training for b in m.buffers(recurse=False)]
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every process
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for b in group:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def ignore_in_ddp(model: torch.nn.Module, names: list[str]) -> None:
    """Tells DDP to leave the parameters and buffers ``names`` alone (neither broadcast nor all-reduced):
    towers kept on the CPU beside an accelerator model."""
    # Private: torch's hook for this (DDP has no public argument for it).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def world_and_rank() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGather(torch.autograd.Function):
    """Concatenates every rank's rows (sizes may differ). Backward: each rank's rows receive the sum
    over ranks of the gradient with respect to them (an all-reduce, which every backend has)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every rank's rows of ``x`` concatenated in rank order, differentiable.

    Returns:
        (the gathered rows, this rank's first row in them, the total number of rows)
    """
    world, rank = world_and_rank()
    if world == 1:
        return x, 0, x.shape[0]
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    return _AllGather.apply(x, sizes, rank), sum(sizes[:rank]), sum(sizes)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``x`` (``[n, ...]``, ``n`` may differ by rank; the other dims may not)
    concatenated in rank order, without gradient, and each rank's ``n``."""
    world, _ = world_and_rank()
    if world == 1:
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sizes


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ``[n]`` ids concatenated in rank order (sizes may differ; no gradient)."""
    return gather_rows(ids)[0]
