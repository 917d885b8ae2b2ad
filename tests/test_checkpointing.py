"""Slim checkpoints: the frozen weights are fingerprinted instead of saved, and checked on resume."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_config
from safetensors.torch import load_file
from test_recipes import SMALL_DATA

import vlfuse.training.setup as training
from vlfuse.checkpointing import CheckpointError, list_checkpoints
from vlfuse.model import VLFuseModel
from vlfuse.training import train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _parts(names):
    return {n.split(".")[0] for n in names}


def test_frozen_state_names_follow_what_trains():
    none = VLFuseModel(tiny_config("model.trainable_encoders=none").model)
    frozen = none.frozen_state_names()
    state = none.state_dict()
    assert set(frozen) == {"image_encoder", "text_encoder"}  # the fusion and head always learn
    for part in ("image_encoder", "text_encoder"):
        assert frozen[part] == sorted(k for k in state if k.startswith(part + "."))
    assert any(n.endswith("running_mean") for n in frozen["image_encoder"])  # BatchNorm statistics too

    lora = VLFuseModel(
        tiny_config(
            "model.trainable_encoders=all", "model.image_encoder.tuning=lora", "model.image_encoder.lora.r=2"
        ).model
    )
    frozen = lora.frozen_state_names()
    assert set(frozen) == {"image_encoder"}
    names = set(frozen["image_encoder"])
    assert not [n for n in names if ".lora_" in n]  # the adapters learn
    assert any(n.endswith(".base_layer.weight") for n in names)  # the adapted convolutions do not
    # only the adapters learn, so the BatchNorm layers are held in eval mode: their statistics are frozen
    bn = [n for n in lora.state_dict() if n.startswith("image_encoder.") and n.endswith("running_mean")]
    assert bn and set(bn) <= names


def test_slim_checkpoint_holds_what_learns(tmp_path):
    sizes = {}
    for mode in ("none", "all"):
        out = tmp_path / mode
        train(
            tiny_config(
                *SMALL_DATA,
                f"train.output_dir={out}",
                "train.max_steps=2",
                f"model.trainable_encoders={mode}",
            )
        )
        AcceleratorState._reset_state(True)
        (checkpoint,) = list_checkpoints(out / "checkpoints")
        keys = set(load_file(str(checkpoint / "model.safetensors")))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        sizes[mode] = sum(p.stat().st_size for p in checkpoint.iterdir())
        final = set(load_file(str(out / "final" / "model.safetensors")))
        assert _parts(final) == {"image_encoder", "text_encoder", "fusion", "head"}  # final/ is whole
        if mode == "none":
            assert _parts(keys) == {"fusion", "head"}
            assert set(state["frozen_weights"]) == {"image_encoder", "text_encoder"}
            for record in state["frozen_weights"].values():
                assert len(record["sha256"]) == 64 and record["tensors"] > 0
        else:
            assert keys == final and state["frozen_weights"] == {}
    assert sizes["none"] < sizes["all"]


def test_changed_frozen_weights_stop_the_resume_naming_the_tower(tmp_path, monkeypatch):
    common = [*SMALL_DATA, f"train.output_dir={tmp_path}", "model.trainable_encoders=none"]
    train(tiny_config(*common, "train.max_steps=2"))
    AcceleratorState._reset_state(True)
    real_build = training.build_model

    def build_with_another_text_tower(cfg, check_task=True):
        model = real_build(cfg, check_task)
        with torch.no_grad():
            next(model.text_encoder.parameters()).add_(1e-3)
        return model

    monkeypatch.setattr(training, "build_model", build_with_another_text_tower)
    with pytest.raises(CheckpointError, match=r"frozen weights of model\.text_encoder differ"):
        train(tiny_config(*common, "train.max_steps=4", "train.resume_from=latest"))
    AcceleratorState._reset_state(True)
    # A resume whose trainable/frozen split differs is refused too (its checkpoint holds other weights).
    monkeypatch.setattr(training, "build_model", real_build)
    with pytest.raises(CheckpointError, match="model.image_encoder"):
        train(
            tiny_config(
                *common, "train.max_steps=4", "train.resume_from=latest", "model.trainable_encoders=image"
            )
        )
