"""Gradient caching (``train.contrastive_chunk_size``): the loss and every parameter's gradient equal the
full-batch computation on 1 and 2 processes, dropout replays its masks, batch norm's running statistics
are updated once per chunk, and a resumed run is bitwise the uninterrupted one."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_config
from safetensors.torch import load_file
from test_recipes import SMALL_DATA, launch
from test_reliability import _losses, train_until_crash_after_checkpoint

from vlfuse.model import VLFuseModel
from vlfuse.tasks import get_task
from vlfuse.training import train
from vlfuse.training.grad_cache import cached_backward, chunks_of

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/scripts/grad_cache_ranks.py"
_spec = importlib.util.spec_from_file_location("grad_cache_ranks", SCRIPT)
ranks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ranks)
TASK = get_task("retrieval")


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 8  # every trainable tensor of both towers, fusion, head
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=f"gradient of {name}")


def _full_batch(model, batch) -> tuple[torch.Tensor, dict]:
    """The plain step: one forward pass over the whole batch, one backward."""
    loss, _ = TASK.loss(model(**batch), batch)
    loss.backward()
    return loss.detach(), _grads(model)


LORA = [
    "model.image_encoder.tuning=lora",
    "model.text_encoder.tuning=lora",
    "model.image_encoder.lora.lora_dropout=0.3",
    "model.text_encoder.lora.lora_dropout=0.3",
]
LAST_BLOCKS = ["model.text_encoder.tuning=last_blocks", "model.image_encoder.tuning=last_blocks"]


@pytest.mark.parametrize("learning", [[], LORA, LAST_BLOCKS], ids=["full", "lora", "last_blocks"])
def test_cached_gradient_equals_the_full_batch_with_dropout_replayed(learning):
    accelerator = Accelerator(cpu=True)
    model, batch = ranks.build(True, *learning)
    model.train()
    torch.manual_seed(3)
    loss = cached_backward(accelerator, model, TASK.loss, batch, ranks.CHUNK)  # chunks of 3, 3, 2
    after_cached = torch.rand(4)
    cached = _grads(model)
    torch.manual_seed(3)
    reference_loss = ranks.reference_backward(accelerator, model, TASK.loss, batch, ranks.CHUNK)
    after_reference = torch.rand(4)
    reference = _grads(model)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-6)
    _assert_same_grads(cached, reference)
    assert torch.equal(after_cached, after_reference)  # the same draws consumed: resumes stay exact
    assert cached["head.logit_scale"].abs().item() > 0  # the temperature learns, once per step
    # The check can fail: other dropout masks (one pass over the whole batch) give other gradients.
    torch.manual_seed(3)
    _, other = _full_batch(model, batch)
    assert max((other[n] - cached[n]).abs().max().item() for n in cached) > 1e-4


def test_without_dropout_the_cached_gradient_is_the_one_pass_gradient():
    accelerator = Accelerator(cpu=True)
    model, batch = ranks.build(dropout=False)
    model.train()
    loss = cached_backward(accelerator, model, TASK.loss, batch, 2)
    cached = _grads(model)
    full_loss, full = _full_batch(model, batch)
    assert loss.item() == pytest.approx(full_loss.item(), abs=1e-6)
    _assert_same_grads(cached, full)


def test_batch_norm_running_statistics_are_updated_once_per_chunk():
    cfg = tiny_config("model.task=retrieval", "model.fusion.name=projection", "model.trainable_encoders=all")
    model = VLFuseModel(cfg.model).train()
    _, batch = ranks.build(dropout=False)
    batch = {**batch, "pixel_values": torch.randn(8, 3, 64, 64)}
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert any("running_mean" in n for n in before)  # test_resnet has batch norm
    cached_backward(Accelerator(cpu=True), model, TASK.loss, batch, 4)
    after_cache = {n: b.clone() for n, b in model.named_buffers()}
    buffers = dict(model.named_buffers())
    for name, value in before.items():  # reset, then the reference: each chunk's forward pass once
        buffers[name].copy_(value)
    with torch.no_grad():
        for chunk in chunks_of(batch, 4):
            model(**chunk)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(after_cache[name], buffer, rtol=0, atol=1e-6, msg=name)
        if "num_batches_tracked" in name:
            assert buffer.item() == 2  # two chunks, each counted once (not twice)


def _launch(out: Path, *args: str) -> list[dict]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config = str(ROOT / "recipes/configs/accelerate/cpu_2proc.yaml")
    result = subprocess.run(
        [accelerate, "launch", "--config_file", config, str(SCRIPT), str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
def test_on_two_processes_the_cached_gradient_equals_the_gathered_batchs(tmp_path):
    # Dropout on: each rank's cached gradient (all-reduced once) equals the reference over the gathered
    # batch with the same masks; the ranks hold the same gradient.
    records = _launch(tmp_path / "dropout.json")
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["rng_after_equal"]
        assert r["cached_loss"] == pytest.approx(r["reference_loss"], abs=1e-6)
        cached = {n: torch.tensor(v) for n, v in r["cached"].items()}
        _assert_same_grads(cached, {n: torch.tensor(v) for n, v in r["reference"].items()})
    _assert_same_grads(
        {n: torch.tensor(v) for n, v in records[0]["cached"].items()},
        {n: torch.tensor(v) for n, v in records[1]["cached"].items()},
        atol=1e-7,
    )
    # Dropout off: the 2-process cached gradient is the one-process gradient of the whole global batch
    # in one pass (every rank's negatives include the other rank's examples).
    records = _launch(tmp_path / "plain.json", "nodropout")
    model, batch = ranks.build(dropout=False)
    model.train()
    _, full = _full_batch(model, batch)
    for r in records:
        flat = {n: g.flatten() for n, g in full.items()}  # the script writes flattened gradients
        _assert_same_grads({n: torch.tensor(v) for n, v in r["cached"].items()}, flat)


RETRIEVAL_RUN = [
    *SMALL_DATA,
    "model.task=retrieval",
    "model.fusion.name=projection",
    "model.fusion.dropout=0.2",
    "data.columns.text=captions",
    "model.trainable_encoders=all",
    "data.hflip_prob=0.5",
    "train.contrastive_chunk_size=3",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.max_steps=6",
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["all", "text"])  # text: the image tower frozen, run once per step
def test_a_resumed_run_with_gradient_caching_is_bitwise_the_uninterrupted_one(tmp_path, monkeypatch, mode):
    run = [*RETRIEVAL_RUN, f"model.trainable_encoders={mode}"]
    train(tiny_config(*run, f"train.output_dir={tmp_path / 'straight'}"))
    AcceleratorState._reset_state(True)
    resumed = tiny_config(*run, f"train.output_dir={tmp_path / 'resumed'}")
    train_until_crash_after_checkpoint(monkeypatch, resumed, step=3)
    AcceleratorState._reset_state(True)
    train(tiny_config(*run, f"train.output_dir={tmp_path / 'resumed'}", "train.resume_from=latest"))
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    a, b = (
        _losses(tmp_path / "straight" / "train_log.jsonl"),
        _losses(tmp_path / "resumed" / "train_log.jsonl"),
    )
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and a == b


def _step_losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_retrieval_under_fsdp2_with_gradient_caching_trains_as_ddp_without(tmp_path):
    # A ViT (no batch norm) learning, and no dropout: chunks change nothing but memory, so FSDP2 with caching
    # (every chunk's gradient reduce-scattered) follows DDP without it step by step. (Retrieval under
    # FSDP2 at all needs the temperature as a one-element vector: FSDP2 shards no scalar.)
    common = [
        *SMALL_DATA,
        "model.task=retrieval",
        "model.fusion.name=projection",
        "model.fusion.dim=16",
        "model.fusion.dropout=0.0",
        "model.image_encoder.name=test_vit",
        "model.image_encoder.pretrained=false",
        "model.image_encoder.image_size=32",
        "model.text_encoder.name=vlfuse:tiny-bert",
        "model.text_encoder.pretrained=false",
        "model.text_encoder.max_length=16",
        "data.columns.text=captions",
        "model.trainable_encoders=image",  # BERT frozen: in eval mode, without its dropout
        "train.log_every=1",
        "train.max_steps=4",
        "train.seed=5",
    ]
    launch("retrieval.py", *common, f"train.output_dir={tmp_path / 'ddp'}", processes=2)
    launch(
        "retrieval.py",
        *common,
        "train.contrastive_chunk_size=3",
        f"train.output_dir={tmp_path / 'fsdp'}",
        processes=2,
        config="cpu_2proc_fsdp.yaml",
    )
    ddp, fsdp = (
        _step_losses(tmp_path / "ddp/train_log.jsonl"),
        _step_losses(tmp_path / "fsdp/train_log.jsonl"),
    )
    assert len(ddp) == len(fsdp) == 4
    assert fsdp == pytest.approx(ddp, abs=1e-4)
    assert abs(ddp[0] - ddp[-1]) > 1e-3  # it trains (the comparison is not between two constants)
    assert VLFuseModel.from_pretrained(tmp_path / "fsdp/final").head.logit_scale.shape == (1,)


def test_a_saved_scalar_temperature_still_loads():
    cfg = tiny_config("model.task=retrieval", "model.fusion.name=projection")
    head = VLFuseModel(cfg.model).head
    head.load_state_dict({"logit_scale": torch.tensor(2.5)})  # as models saved before it was a vector
    assert head.logit_scale.shape == (1,) and head.logit_scale.item() == 2.5


def test_under_bf16_autocast_the_cached_gradient_equals_the_full_batch():
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, batch = ranks.build(True)
    prepared = accelerator.prepare(model)  # forward under bf16 autocast
    prepared.train()
    try:
        torch.manual_seed(3)
        loss = cached_backward(accelerator, prepared, TASK.loss, batch, ranks.CHUNK)
        cached = _grads(model)
        torch.manual_seed(3)
        reference_loss = ranks.reference_backward(accelerator, prepared, TASK.loss, batch, ranks.CHUNK)
        reference = _grads(model)
    finally:
        AcceleratorState._reset_state(True)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-6)
    _assert_same_grads(cached, reference)


def test_a_frozen_tower_runs_once_per_step_not_in_both_passes():
    # LiT-style: the image tower frozen (not cached), the text tower learning.
    accelerator = Accelerator(cpu=True)
    model, batch = ranks.build(True, "model.trainable_encoders=text")
    model.train()
    calls = []
    model.image_encoder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    torch.manual_seed(3)
    loss = cached_backward(accelerator, model, TASK.loss, batch, ranks.CHUNK)
    assert calls == [3, 3, 2]  # once per chunk: its features serve both passes
    cached = _grads(model)
    torch.manual_seed(3)
    reference_loss = ranks.reference_backward(accelerator, model, TASK.loss, batch, ranks.CHUNK)
    reference = _grads(model)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-6)
    _assert_same_grads(cached, reference)
    assert not [n for n in cached if n.startswith("image_encoder.")]


def test_with_gradient_accumulation_each_micro_batch_is_one_cached_batch():
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model, batch = ranks.build(False)
        model.train()
        halves = chunks_of(batch, 4)  # two micro-batches of 4; each cached in chunks of 3 and 1
        for half in halves:
            with accelerator.accumulate(model):
                cached_backward(accelerator, model, TASK.loss, half, ranks.CHUNK)
        cached = _grads(model)
        for half in halves:
            with accelerator.accumulate(model):
                loss, _ = TASK.loss(model(**half), half)
                accelerator.backward(loss)
        plain = _grads(model)
    finally:
        AcceleratorState._reset_state(True)
    _assert_same_grads(cached, plain)
