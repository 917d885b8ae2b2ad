"""Two real processes (gloo on the CPU), mixed precision and gradient accumulation."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from conftest import TINY_MODEL, tiny_config
from safetensors.torch import load_file, load_model
from test_recipes import SMALL_DATA, launch, read_metrics

from vlfuse.model import VLFuseModel
from vlfuse.training import list_checkpoints, train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerate keeps one process-wide state; each in-process run here needs its own settings.
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["none", "image", "text", "all"])
def test_two_processes_keep_ranks_identical_and_frozen_towers_untouched(tmp_path, mode):
    args = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        f"model.trainable_encoders={mode}",
        f"train.output_dir={tmp_path}",
        "train.max_steps=3",
        "train.seed=3",
    ]
    launch("../tests/scripts/grounding_dump_ranks.py", *args, processes=2)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"ranks differ at {k}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2
    set_seed(3)
    start = VLFuseModel(tiny_config(*args).model).state_dict()
    trainable = {"none": (), "image": ("image",), "text": ("text",), "all": ("image", "text")}[mode]
    for tower in ("image", "text"):
        keys = [k for k in start if k.startswith(f"{tower}_encoder.")]
        moved = [k for k in keys if not torch.equal(rank0[k], start[k])]
        if tower in trainable:
            assert moved, f"trainable {tower} tower did not learn"
        else:
            assert moved == [], f"frozen {tower} tower's weights or buffers moved: {moved[:5]}"
    assert any(not torch.equal(rank0[k], start[k]) for k in start if k.startswith("head."))
    # The 2-process checkpoint and final model load strictly into a plain single-process model.
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")
    load_model(VLFuseModel(tiny_config(*args).model), str(checkpoint / "model.safetensors"), strict=True)
    assert not [
        k for k in load_file(str(checkpoint / "model.safetensors")) if k.startswith(("module.", "_orig_mod."))
    ]
    reloaded = VLFuseModel.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(reloaded[k], rank0[k]) for k in rank0)


def _odd_eval_rows(tmp_path) -> int:
    from vlfuse.data.loading import load_split
    from vlfuse.tasks.grounding import GroundingDataset

    cfg = tiny_config(*SMALL_DATA)
    ds = load_split(cfg.data, "validation")
    for n in range(5, len(ds) + 1):
        if len(GroundingDataset(ds.select(range(n)), cfg.data, 64, (0.5,) * 3, (0.5,) * 3)) % 2 == 1:
            return n
    raise AssertionError("no odd-sized prefix")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_metrics_equal_on_one_and_two_processes(tmp_path):
    cfg = tiny_config(
        *SMALL_DATA, "model.fusion.name=dense", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2"
    )
    train(cfg)
    rows = _odd_eval_rows(tmp_path)
    common = [
        *TINY_MODEL,
        *SMALL_DATA,
        f"model.init_from={tmp_path / 'run' / 'final'}",
        f"data.max_eval_samples={rows}",
        "train.eval_batch_size=4",
    ]
    launch("evaluate.py", *common, f"train.output_dir={tmp_path / 'one'}", processes=1)
    launch("evaluate.py", *common, f"train.output_dir={tmp_path / 'two'}", processes=2)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")[0]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["count"] % 2 == 1 and one["count"] == two["count"]
    for key in ("acc@0.5", "acc@0.75", "miou"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key


def test_bf16_on_cpu_trains_with_finite_loss(tmp_path):
    cfg = tiny_config(
        *SMALL_DATA,
        "train.mixed_precision=bf16",
        f"train.output_dir={tmp_path}",
        "train.max_steps=3",
        "train.log_every=1",
        "model.fusion.name=dense",
        "model.trainable_encoders=all",
    )
    metrics = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert torch.isfinite(torch.tensor(summary["last_loss"]))
    assert 0.0 <= metrics["validation"]["miou"] <= 1.0


def test_accumulation_matches_one_big_batch(tmp_path):
    # No BatchNorm or dropout in the trainable path: both towers frozen (the CNN's BN in eval mode, BERT's
    # dropout off), fusion dropout 0.
    base = [
        *SMALL_DATA,
        "model.fusion.name=concat",
        "model.fusion.dropout=0.0",
        "model.trainable_encoders=none",
        "train.max_steps=3",
        "train.max_grad_norm=null",
        "train.lr=1e-3",
        "train.encoder_lr=1e-3",
    ]
    train(tiny_config(*base, "train.batch_size=16", f"train.output_dir={tmp_path / 'big'}"))
    AcceleratorState._reset_state(True)
    train(
        tiny_config(
            *base,
            "train.batch_size=4",
            "train.gradient_accumulation_steps=4",
            f"train.output_dir={tmp_path / 'acc'}",
        )
    )
    big = load_file(str(tmp_path / "big" / "final" / "model.safetensors"))
    acc = load_file(str(tmp_path / "acc" / "final" / "model.safetensors"))
    set_seed(0)  # as train() does before building the model
    start = VLFuseModel(tiny_config(*base).model).state_dict()
    moved = [k for k in big if not torch.equal(big[k], start[k])]
    assert any(k.startswith("fusion.") for k in moved) and any(k.startswith("head.") for k in moved)
    for k in big:
        torch.testing.assert_close(
            acc[k], big[k], rtol=1e-4, atol=1e-5, msg=f"accumulated run differs at {k}"
        )


def test_gradient_checkpointing_only_in_trainable_towers():
    model = VLFuseModel(tiny_config("model.trainable_encoders=text").model)
    model.set_gradient_checkpointing(True)
    assert model.text_encoder.is_grad_checkpointing
    assert not getattr(model.image_encoder.model, "grad_checkpointing", False)
    batch = model.text_encoder.tokenize(["the red circle", "the blue one"])
    model.train()
    out = model(pixel_values=torch.randn(2, 3, 64, 64), **batch)
    out["boxes"].sum().backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters())
