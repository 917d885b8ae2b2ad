"""Speed options of a training run (``train.channels_last``, ``train.compile``, ``train.fused_optimizer``,
``train.reuse_cpu_memory``)
and the measurements that say how close a run is to the machine's limit (FLOPs of a step, the peak
matmul rate). ``benchmarks/throughput.py`` prints both; ``docs/benchmarks.md`` has the figures."""

from __future__ import annotations

import ctypes
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlfuse.model import VLFuseModel
from vlfuse.tasks import get_task


def convolutional(module: nn.Module) -> bool:
    """Whether ``module`` does real convolution work: a convolution wider than 1x1 that is not a patch
    embedding (a ViT's only convolution, whose kernel equals its stride)."""
    return any(
        isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.kernel_size != m.stride
        for m in module.modules()
    )


def use_channels_last(model: nn.Module) -> list[str]:
    """Puts the model's convolutional parts (a CNN image tower, the dense fusion's convolutions) in
    channels-last memory order: oneDNN on CPUs and tensor cores on GPUs run convolutions faster on it.
    The image tower also turns its input to that order. Values are unchanged; saved weights are
    contiguous either way (``vlfuse.hub.save_model`` and Accelerate's ``save_state`` make them so).

    Returns:
        The names of the parts converted (e.g. ``["image_encoder", "fusion"]``).
    """
    converted = []
    for name in ("image_encoder", "fusion"):
        part = getattr(model, name)
        if convolutional(part):
            part.to(memory_format=torch.channels_last)
            if hasattr(part, "channels_last"):
                part.channels_last = True
            converted.append(name)
    return converted


# glibc's mallopt parameters (<malloc.h>, documented in mallopt(3))
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def reuse_freed_cpu_memory() -> str | None:
    """Makes this process keep the CPU memory it frees for its next allocations (glibc's ``mallopt``: no
    ``mmap`` for large blocks, no trimming of the heap). By default glibc serves each block over 32 MiB
    (a batch's activations, most of them) with a fresh ``mmap`` and returns it on free, so every step
    faults its activations' pages in again: on a 2-core CPU a ResNet-50 LoRA step spent 12 s of system
    time in 5 steps, and ran 1.33x faster with this (4.83 -> 3.64 s per step); resident memory stays near
    its peak (3068 -> 3588 MiB there). Process-wide and not undone; DataLoader workers forked later
    inherit it. glibc's own counterpart of the jemalloc/tcmalloc preload that Intel's PyTorch CPU tuning
    guide recommends, without a library to install.

    Returns:
        None when applied; else why not (not Linux with glibc, or ``mallopt`` refused a value).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not Linux with glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success; the trim threshold is an int (2 GiB - 1: never trimmed in practice)
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "glibc's mallopt refused the settings"
    return None


def compiler_available(device: torch.device) -> str | None:
    """None when ``torch.compile`` works on ``device`` (a tiny function is compiled and run), else why
    not (e.g. no C++ compiler for the CPU backend, no Triton for the GPU one)."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
        fn(torch.ones(4, device=device))
    except Exception as err:  # inductor raises several types for a missing toolchain
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        torch.compiler.reset()  # forget the probe's compiled code (kept process-wide)
    return None


def compile_parts(model: nn.Module, parts: list[str]) -> None:
    """``nn.Module.compile`` (in place: parameter names and state dicts are unchanged) on each of
    ``parts`` (``image_encoder``, ``text_encoder``, ``fusion``, ``head``)."""
    for name in parts:
        getattr(model, name).compile()


def optimizer_options(params: list[nn.Parameter], fused: bool) -> dict[str, Any]:
    """AdamW's implementation for ``params``: the fused kernel (one kernel for every parameter's update)
    when asked for and every parameter is a float tensor on a device that has one (CUDA, CPU), else
    the multi-tensor (``foreach``) one."""
    devices = {p.device.type for p in params}
    if fused and params and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def count_flops(fn: Callable[[], Any]) -> int:
    """The floating-point operations of running ``fn`` once (``torch.utils.flop_counter``: matmuls,
    convolutions and attention, forward and backward; a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def train_step_flops(cfg: Any) -> int:
    """The FLOPs of one training step of ``cfg`` (its model, task and ``train.batch_size``), counted on
    the first batch of its train split, loss and backward included: every tower's forward, the backward
    of what trains (a frozen tower runs under ``no_grad``). A feature cache is not used (its towers'
    forward counts every step). A split smaller than a batch is counted on its rows, scaled to a batch.
    """
    torch.manual_seed(cfg.train.seed)
    task = get_task(cfg.model.task)
    model = VLFuseModel(cfg.model).train()
    dataset = task.build_dataset(cfg, model, cfg.data.train_split, train=True)
    n = min(cfg.train.batch_size, len(dataset))
    batch = task.collator(model, train=True)([dataset[i] for i in range(n)])
    batch.pop("bad_rows", None)
    flops = count_flops(lambda: task.loss(model(**batch), batch)[0].backward())
    return round(flops * cfg.train.batch_size / n)


def peak_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0
) -> float:
    """The FLOP/s a large matrix product reaches on ``device`` in ``dtype`` with the process's threads:
    the practical peak a training step is compared with (2 * size^3 per product, best of ~``seconds``).

    On a CPU the best of two kernels counts: ``torch.mm`` (MKL or OpenBLAS) and the same product as a 1x1
    convolution (oneDNN, which runs a model's convolutions). They can differ by 2.5x: on an AMD EPYC with
    AVX-512, MKL's float32 product reaches about 200 GFLOP/s on 2 cores and oneDNN's about 490.
    """
    return max(
        _best_rate(kernel, 2 * size**3, device, seconds) for kernel in matmul_kernels(device, dtype, size)
    )


def matmul_kernels(device: torch.device, dtype: torch.dtype, size: int) -> list[Callable[[], Any]]:
    """Ways to run one ``size x size`` by ``size x size`` product (2 * size^3 FLOPs each): ``torch.mm``,
    and on a CPU a 1x1 convolution over ``size`` positions (oneDNN's kernel)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if device.type == "cpu":
        conv = nn.Conv2d(size, size, 1, bias=False).to(dtype).to(memory_format=torch.channels_last)
        x = a.reshape(1, size, -1, 1).contiguous(memory_format=torch.channels_last)  # size positions
        kernels.append(lambda: conv(x))
    return kernels


@torch.no_grad()
def _best_rate(kernel: Callable[[], Any], flops: float, device: torch.device, seconds: float) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up
        kernel()
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        kernel()
        sync()
        best = min(best, time.perf_counter() - start)
    return flops / best
