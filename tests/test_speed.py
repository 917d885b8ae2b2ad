"""The speed options (``train.channels_last``, ``train.fused_optimizer``, ``train.compile``, DataLoader
workers) change no result beyond a stated tolerance, and the FLOP count that the benchmarks divide by
time is right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_config
from helpers import train_until_crash_after_checkpoint
from safetensors.torch import load_file
from test_recipes import SMALL_DATA

from vlfuse.model import VLFuseModel
from vlfuse.training import train
from vlfuse.training.speed import convolutional, count_flops, optimizer_options, use_channels_last

LOSS_TOL = 1e-4  # convolutions in another memory order, or another optimizer kernel: same maths, other sums


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _losses(folder: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines())]


COMMON = [*SMALL_DATA, "model.fusion.name=dense", "train.log_every=1", "train.max_steps=4"]


def _run(tmp_path, name: str, *overrides: str) -> list[float]:
    AcceleratorState._reset_state(True)
    train(tiny_config(*COMMON, *overrides, f"train.output_dir={tmp_path / name}"))
    return _losses(tmp_path / name)


def test_the_flop_count_of_a_linear_layer_is_the_hand_count():
    m, k, n = 16, 32, 8
    layer = torch.nn.Linear(k, n)
    x = torch.randn(m, k)
    assert count_flops(lambda: layer(x)) == 2 * m * k * n
    # backward: the weight's gradient (2mkn); the input's too (another 2mkn) when it needs one
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * m * k * n)
    x.requires_grad_(True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * (2 * m * k * n)
    conv, image = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.randn(2, 3, 5, 5)
    assert count_flops(lambda: conv(image)) == 2 * (2 * 5 * 5) * 4 * (3 * 3 * 3)


def test_channels_last_applies_to_convolutional_parts_only():
    model = VLFuseModel(tiny_config("model.fusion.name=dense").model)
    assert use_channels_last(model) == ["image_encoder", "fusion"]
    conv = model.fusion.blocks[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    vit = VLFuseModel(tiny_config("model.image_encoder.name=test_vit", "model.fusion.name=concat").model)
    assert not convolutional(vit.image_encoder)  # a ViT's patch embedding is no real convolution
    assert use_channels_last(vit) == []


def test_channels_last_and_the_fused_optimizer_keep_the_losses(tmp_path):
    plain = _run(tmp_path, "plain", "train.channels_last=false", "train.fused_optimizer=false")
    fast = _run(tmp_path, "fast", "train.channels_last=true", "train.fused_optimizer=true")
    assert len(plain) == len(fast) == 4
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), atol=LOSS_TOL, rtol=0)


def test_weights_saved_from_a_channels_last_run_load_strictly_and_predict_alike(tmp_path):
    from PIL import Image

    _run(tmp_path, "run", "train.channels_last=true")
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(t.is_contiguous() for t in saved.values())
    loaded = VLFuseModel.from_pretrained(tmp_path / "run" / "final")  # strict: every key, every shape
    images = [Image.new("RGB", (40, 30), (200, 50, 50)), Image.new("RGB", (30, 50), (20, 150, 50))]
    texts = ["the red one", "the green one"]
    eager = loaded.predict(images, texts)
    use_channels_last(loaded)
    assert loaded.fusion.blocks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded.predict(images, texts), eager, atol=1e-5, rtol=1e-5)


def test_the_optimizer_kernel_follows_the_devices_and_the_key():
    p = torch.nn.Parameter(torch.randn(3))
    assert optimizer_options([p], fused=True) == {"fused": True}
    assert optimizer_options([p], fused=False) == {"foreach": True}


def test_workers_change_nothing_in_the_losses(tmp_path):
    none = _run(tmp_path, "w0", "data.num_workers=0", "data.hflip_prob=0.5")
    two = _run(tmp_path, "w2", "data.num_workers=2", "data.hflip_prob=0.5")
    assert none == two  # bitwise: workers only move where examples are made


FAULTS = """
import resource, sys, torch
from vlfuse.training.speed import reuse_freed_cpu_memory
if sys.argv[1] == "on":
    assert reuse_freed_cpu_memory() is None
def faults():  # minor page faults of allocating, touching and freeing 64 MiB (16,384 pages of 4 KiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 * 2**20 // 4)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min([faults() for _ in range(8)][4:]))  # the heap settles within the first few
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only (the function says so)")
def test_reused_cpu_memory_is_not_faulted_in_again():
    """By default glibc maps a 64 MiB block afresh and unmaps it on free: each allocation faults all its
    pages in again (16,385 faults measured). Kept for reuse, once the heap has grown to hold the block (two
    allocations), an allocation faults none."""
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("off", "on")
    }
    assert faults["on"] < 164  # under 1% of the block's pages
    assert faults["off"] > faults["on"]  # (a system with transparent huge pages on always faults 2 MiB pages)


def test_the_run_says_whether_freed_memory_is_kept(tmp_path, monkeypatch, capsys):
    import vlfuse.training.setup as setup

    _run(tmp_path, "kept", "train.reuse_cpu_memory=true")
    assert "freed CPU memory kept for reuse (train.reuse_cpu_memory)" in capsys.readouterr().out
    monkeypatch.setattr(setup, "reuse_freed_cpu_memory", lambda: "not Linux with glibc (Darwin unknown libc)")
    _run(tmp_path, "elsewhere", "train.reuse_cpu_memory=true")
    assert "train.reuse_cpu_memory=true, but not applied: not Linux with glibc" in capsys.readouterr().out
    called = []
    monkeypatch.setattr(setup, "reuse_freed_cpu_memory", lambda: called.append(1))
    _run(tmp_path, "off", "train.reuse_cpu_memory=false")
    assert called == [] and "reuse" not in capsys.readouterr().out


def test_without_a_compiler_the_run_says_so_and_stays_eager(tmp_path, monkeypatch, capsys):
    import vlfuse.training.setup as setup

    monkeypatch.setattr(setup, "compiler_available", lambda device: "no C++ compiler found")
    compiled = []
    monkeypatch.setattr(setup, "compile_parts", lambda model, parts: compiled.append(parts))
    eager = _run(tmp_path, "eager", "train.compile=false")
    asked = _run(tmp_path, "asked", "train.compile=true")
    assert compiled == [] and asked == eager
    assert "train.compile=true, but torch.compile is not used: no C++ compiler found; running eager" in (
        capsys.readouterr().out
    )


def test_a_compiled_run_without_deterministic_algorithms_says_it_is_not_bitwise(
    tmp_path, monkeypatch, capsys
):
    import vlfuse.training.setup as setup

    monkeypatch.setattr(setup, "compiler_available", lambda device: None)
    compiled = []
    monkeypatch.setattr(setup, "compile_parts", lambda model, parts: compiled.append(parts))
    _run(tmp_path, "asked", "train.compile=true")
    assert compiled == [["image_encoder", "text_encoder", "fusion", "head"]]
    assert not torch.are_deterministic_algorithms_enabled()
    assert "not bitwise reproducible without train.deterministic=true" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """torch.compile (inductor, CPU) of the towers, fusion and head: the losses of eager training within
    the tolerance, and a resumed compiled run bitwise equal to an uninterrupted one.

    Inductor draws dropout masks with its own generator (same distribution, other masks); its
    ``fallback_random`` (a private setting of torch._inductor) makes it draw them as eager does, so that
    the two runs see the same masks and their losses can be compared. Bitwise needs
    ``train.deterministic``: without it inductor sums the word embeddings' gradient with atomic adds, in
    an order that varies between runs (seen: 2e-11 apart in about half the runs on a 2-core Xeon)."""
    import torch._inductor.config as inductor_config

    try:
        with inductor_config.patch(fallback_random=True):
            _compiled_runs(tmp_path, monkeypatch, capsys)
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: leave the other tests as they were


def _compiled_runs(tmp_path, monkeypatch, capsys) -> None:
    common = ["train.checkpoint_every=2", "model.trainable_encoders=all", "train.deterministic=true"]
    eager = _run(tmp_path, "eager", *common)
    assert torch.are_deterministic_algorithms_enabled()
    compiled = _run(tmp_path, "compiled", *common, "train.compile=true")
    out = capsys.readouterr().out
    assert "torch.compile: image_encoder, text_encoder, fusion, head" in out
    assert "not bitwise reproducible" not in out
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=LOSS_TOL, rtol=0)
    AcceleratorState._reset_state(True)
    cfg = tiny_config(*COMMON, *common, "train.compile=true", f"train.output_dir={tmp_path / 'resumed'}")
    train_until_crash_after_checkpoint(monkeypatch, cfg, step=2)
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    train(
        tiny_config(
            *COMMON,
            *common,
            "train.compile=true",
            f"train.output_dir={tmp_path / 'resumed'}",
            "train.resume_from=latest",
        )
    )
    assert _losses(tmp_path / "resumed")[-2:] == compiled[-2:]
    straight = load_file(str(tmp_path / "compiled" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_every_peak_kernel_is_one_square_product():
    """The peak divides 2 * size^3 by each kernel's time: each must be exactly that product."""
    from vlfuse.training.speed import matmul_kernels, peak_matmul_flops

    kernels = matmul_kernels(torch.device("cpu"), torch.float32, 64)
    assert len(kernels) == 2  # torch.mm and oneDNN's 1x1 convolution
    for kernel in kernels:
        with torch.no_grad():
            assert count_flops(kernel) == 2 * 64**3
    assert 1e8 < peak_matmul_flops(torch.device("cpu"), size=256, seconds=0.2) < 1e14


def test_unset_workers_are_none_on_the_cpu_and_up_to_four_beside_a_gpu(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vlfuse.training.setup import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    gpu = SimpleNamespace(device=torch.device("cuda", 0), num_processes=1)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(gpu) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on 16 cores: 2 each, one left for the loop
    assert default_workers(gpu) == 1
    assert default_workers(SimpleNamespace(device=torch.device("cpu"), num_processes=1)) == 0
    monkeypatch.undo()
    _run(tmp_path, "run")  # a run with the key unset resolves it, and says so in its config
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "num_workers: 0" in saved
