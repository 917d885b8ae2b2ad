"""FSDP2 on two CPU processes (gloo), through the shipped recipes/configs/accelerate/cpu_2proc_fsdp.yaml:
frozen towers, end-to-end and LoRA; really sharded; final/ loads strictly into one process and predicts
as the sharded model did; a resumed run ends where an uninterrupted one does (and end-to-end where DDP
does); metrics equal those of one process."""

import json

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file
from test_recipes import SMALL_DATA, launch, read_metrics

from vlfuse.model import VLFuseModel

FSDP = "cpu_2proc_fsdp.yaml"
PREDICT = "../tests/scripts/grounding_fsdp_predict.py"
MODES = {
    "none": ["model.trainable_encoders=none"],
    "all": ["model.trainable_encoders=all"],
    "lora": [
        "model.trainable_encoders=all",
        "model.text_encoder.tuning=lora",
        "model.image_encoder.tuning=lora",
    ],
}


def _args(out, mode, *extra):
    return [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        *MODES[mode],
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.seed=5",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["none", "all", "lora"])
def test_fsdp2_shards_trains_resumes_and_final_loads_strictly_and_predicts_alike(tmp_path, mode):
    """One uninterrupted FSDP2 run per mode, checked for sharding, final/, predictions and metrics; for
    none and all also resumed from its step-2 checkpoint (and, for all, compared with DDP)."""
    from PIL import Image

    out = tmp_path / "fsdp"
    launch(PREDICT, *_args(out, mode), processes=2, config=FSDP)
    # Really sharded (not DDP in disguise): each rank holds about half of every parameter's elements.
    for rank in (0, 1):
        held = json.loads((out / f"sharding_rank{rank}.json").read_text())
        assert held["distributed_type"] == "DistributedType.FSDP"
        assert 0.4 * held["global"] < held["local"] < 0.6 * held["global"]
    gathered = load_file(str(out / "fsdp_state.safetensors"))
    model = VLFuseModel.from_pretrained(out / "final")  # strict: every weight present, none extra
    state = model.state_dict()
    if mode != "lora":  # lora: final/ holds the merged weights, the sharded model the adapters
        assert set(gathered) == set(state)
        for k, v in gathered.items():
            assert torch.equal(state[k], v), k
    boxes = model.predict(
        [Image.new("RGB", (90, 40), (200, 20, 20)), Image.new("RGB", (30, 70), (20, 200, 20))],
        ["the red circle", "the lowest shape"],
    )
    torch.testing.assert_close(
        boxes, load_file(str(out / "fsdp_boxes.safetensors"))["boxes"], atol=1e-4, rtol=1e-4
    )
    # the run's last metrics equal one process evaluating its final/ on the same data
    fsdp_metrics = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] == 4][0]
    launch(
        "evaluate.py",
        *TINY_MODEL,
        *SMALL_DATA,
        f"model.init_from={out / 'final'}",
        f"train.output_dir={tmp_path / 'one'}",
        processes=1,
    )
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")[0]
    assert one["count"] == fsdp_metrics["count"]
    for key in ("acc@0.5", "acc@0.75", "miou"):
        assert one[key] == pytest.approx(fsdp_metrics[key], abs=1e-4), key
    if mode == "lora":
        return
    a = load_file(str(out / "final" / "model.safetensors"))
    if mode == "none":
        # A damaged shard of the newest (sharded) checkpoint: resume_from=latest falls back to step 2
        # with one line, and ends where the uninterrupted run did.
        shards = sorted((out / "checkpoints" / "step_4").rglob("*.distcp"))
        assert shards and (out / "checkpoints" / "step_4" / "pytorch_model_fsdp_0" / ".metadata").is_file()
        data = bytearray(shards[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        shards[0].write_bytes(bytes(data))
        resumed = out
        run = launch("grounding.py", *_args(out, mode, "train.resume_from=latest"), processes=2, config=FSDP)
        name = shards[0].relative_to(out / "checkpoints" / "step_4").as_posix()
        assert f"skipping checkpoint step_4: {shards[0]} is truncated or corrupted" in run.stdout, name
        assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in run.stdout
    else:
        resumed = tmp_path / "resumed"
        launch(
            "grounding.py",
            *_args(resumed, mode, f"train.resume_from={out / 'checkpoints' / 'step_2'}"),
            processes=2,
            config=FSDP,
        )
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise, as the one-process resume tests
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl")]
    assert steps[-1:] == [4] and steps.count(2) == (1 if resumed == out else 0)  # it started at step 2
    if mode == "all":  # sharded training computes what DDP computes (float summation order aside)
        ddp = tmp_path / "ddp"
        # FSDP leaves convolutions in their usual memory order (train.channels_last applies to unsharded
        # runs only): the DDP run does the same, so both do the same arithmetic.
        launch(
            "grounding.py",
            *_args(ddp, mode, "train.channels_last=false"),
            processes=2,
            config="cpu_2proc.yaml",
        )
        c = load_file(str(ddp / "final" / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], c[k], atol=1e-5, rtol=1e-4, msg=k)


def test_an_fsdp1_config_on_cpu_processes_is_refused_and_other_launches_are_left_alone(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from vlfuse.distributed import use_fsdp_on_cpu_processes
    from vlfuse.schema import ConfigError

    cpu_ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, state=SimpleNamespace())
    use_fsdp_on_cpu_processes(cpu_ddp)  # no FSDP asked for: DDP stays
    assert cpu_ddp.distributed_type == DistributedType.MULTI_CPU and not vars(cpu_ddp.state)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        use_fsdp_on_cpu_processes(cpu_ddp)
    on_gpus = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace())
    use_fsdp_on_cpu_processes(on_gpus)  # Accelerate already chose FSDP: nothing to do
    assert not vars(on_gpus.state)
