"""The grounding recipe launched for real through ``accelerate launch``, a few steps each."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, tiny_config

from vlfuse.checkpointing import list_checkpoints
from vlfuse.model import VLFuseModel
from vlfuse.training import train

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
SMALL_DATA = ["data.shapes_train_size=48", "data.shapes_eval_size=11", "train.batch_size=8"]


def launch(
    script: str, *args: str, processes: int = 1, timeout: int = 300, config: str = "cpu_2proc.yaml"
) -> subprocess.CompletedProcess:
    """Runs a recipe through ``accelerate launch``; two processes are gloo ranks on the CPU, through the
    shipped ``config`` (DDP: ``cpu_2proc.yaml``; FSDP2: ``cpu_2proc_fsdp.yaml``)."""
    env = dict(os.environ)
    if processes == 2:
        # Two gloo ranks on a CPU machine, through the shipped config (use_cpu + this variable).
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes/configs/accelerate" / config)]
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        cmd = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", "1"]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*cmd, str(ROOT / "recipes" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "all"])
def test_recipe_through_accelerate_launch_and_resume(tmp_path, mode):
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        f"model.trainable_encoders={mode}",
        f"train.output_dir={out}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.keep_last=2",
    ]
    result = launch("grounding.py", *common, "train.max_steps=4")
    assert "validation: acc@0.5=" in result.stdout
    assert (out / "config.yaml").is_file() and (out / "final" / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_2", "step_4"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["split"] == "validation" and r["count"] > 11 for r in records)
    saved_cfg = (out / "config.yaml").read_text()
    assert f"trainable_encoders: {mode}" in saved_cfg

    resumed = launch("grounding.py", *common, "train.max_steps=6", "train.resume_from=latest")
    assert "at step 4" in resumed.stdout
    # output captured (no terminal): plain progress lines, no progress-bar frames
    assert "\r" not in resumed.stdout + resumed.stderr
    assert re.search(r"train step 6/6 \(100%\): loss [\d.]+, lr [\d.e+-]+, [\d.]+ samples/s", resumed.stdout)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_4", "step_6"]  # keep_last=2


@pytest.mark.slow
def test_evaluate_recipe_matches_training_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        *SMALL_DATA,
        "model.fusion.name=dense",
        f"train.output_dir={out}",
        "train.max_steps=3",
        "train.eval_every=3",
    )
    last = train(cfg)["validation"]
    result = launch(
        "evaluate.py",
        *TINY_MODEL,
        *SMALL_DATA,
        f"model.init_from={out / 'final'}",
        f"train.output_dir={tmp_path / 'eval'}",
        "data.eval_split=[validation,test]",
    )
    assert "validation: acc@0.5=" in result.stdout and "test: acc@0.5=" in result.stdout
    records = {r["split"]: r for r in read_metrics(tmp_path / "eval" / "metrics.jsonl")}
    for key in ("acc@0.5", "acc@0.75", "miou", "count"):
        assert records["validation"][key] == pytest.approx(last[key], abs=1e-6)


@pytest.mark.slow
def test_final_model_predicts_like_the_trained_one(tmp_path):
    from PIL import Image

    cfg = tiny_config(
        *SMALL_DATA, "model.fusion.name=transformer", f"train.output_dir={tmp_path}", "train.max_steps=2"
    )
    train(cfg)
    model = VLFuseModel.from_pretrained(tmp_path / "final")
    again = VLFuseModel.from_pretrained(tmp_path / "final")
    images = [Image.new("RGB", (90, 40), (200, 20, 20)), Image.new("RGB", (30, 70))]
    texts = ["the red circle", "the lowest shape"]
    assert torch.equal(model.predict(images, texts), again.predict(images, texts))
    from safetensors.torch import load_file

    saved = load_file(str(list_checkpoints(tmp_path / "checkpoints")[-1] / "model.safetensors"))
    frozen = {n for names in model.frozen_state_names().values() for n in names}
    assert frozen and set(saved) == set(model.state_dict()) - frozen  # slim: what trains
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.slow
def test_retrieval_recipe_on_two_processes_with_resume(tmp_path):
    """recipes/retrieval.py through accelerate launch on 2 ranks (negatives gathered across them)."""
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.task=retrieval",
        "model.fusion.name=projection",
        "data.columns={image: image, text: captions}",
        "model.trainable_encoders=text",
        f"train.output_dir={out}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    ]
    result = launch("retrieval.py", *common, "train.max_steps=4", processes=2)
    assert "validation: i2t_r@1=" in result.stdout and "x chance" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    # every caption of the 11 validation images is scored once, on 2 processes
    assert all(r["images"] == 11 and r["texts"] == 33 for r in records)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_2", "step_4"]
    resumed = launch("retrieval.py", *common, "train.max_steps=6", "train.resume_from=latest", processes=2)
    assert "at step 4" in resumed.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4, 6]
    model = VLFuseModel.from_pretrained(out / "final")
    assert model.config.task == "retrieval" and model.trainable_encoders == "text"
    torch.manual_seed(0)  # train() builds its model right after set_seed(train.seed=0)
    start = VLFuseModel(tiny_config(*common[:-3]).model)
    first, initial = model.image_encoder.state_dict(), start.image_encoder.state_dict()
    assert all(torch.equal(first[k], initial[k]) for k in first)  # the frozen image tower never moved
    moved, text_start = model.text_encoder.state_dict(), start.text_encoder.state_dict()
    assert not all(torch.equal(moved[k], text_start[k]) for k in moved)  # the trainable one did


@pytest.mark.slow
def test_vqa_recipe_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    common = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.task=classification",
        "model.fusion.name=dense",
        "data.columns={image: image, question: question, answer: answer}",
        "model.trainable_encoders=none",
        f"train.output_dir={out}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    ]
    result = launch("vqa.py", *common, "train.max_steps=4")
    assert "answer vocabulary:" in result.stdout and "majority-answer baseline" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["count"] == 11 and 0 <= r["accuracy"] <= 1 for r in records)
    saved = (out / "config.yaml").read_text()
    model = VLFuseModel.from_pretrained(out / "final")
    assert model.config.answers and all(
        f"- {a}" in saved or f"- '{a}'" in saved for a in model.config.answers
    )
    resumed = launch("vqa.py", *common, "train.max_steps=6", "train.resume_from=latest")
    assert "at step 4" in resumed.stdout
    evaluated = launch(
        "evaluate.py",
        "--config",
        str(ROOT / "recipes/configs/vqa/shapes.yaml"),
        *TINY_MODEL,
        *SMALL_DATA,
        f"model.init_from={out / 'final'}",
        f"train.output_dir={tmp_path / 'eval'}",
    )
    last = read_metrics(out / "metrics.jsonl")[-1]
    again = read_metrics(tmp_path / "eval" / "metrics.jsonl")[-1]
    assert "validation: accuracy=" in evaluated.stdout
    assert again["accuracy"] == pytest.approx(last["accuracy"], abs=1e-6)
