"""Every YAML config shipped with the recipes loads into the schema."""

from pathlib import Path

import pytest

from vlfuse.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {
        "shapes.yaml",
        "refcoco_frozen.yaml",
        "refcoco_end_to_end.yaml",
        "lmms_refcoco_eval.yaml",
        "flickr30k.yaml",
        "lmms_flickr30k_eval.yaml",
        "vqav2_small.yaml",
    } <= names
    assert {"grounding", "retrieval", "vqa"} <= {p.parent.name for p in CONFIGS}


@pytest.mark.parametrize("path", [p for p in CONFIGS if "accelerate" not in p.parts], ids=lambda p: p.name)
def test_config_loads(path):
    text = path.read_text()
    assert text.startswith("#") and "launch" in text.splitlines()[1] + text.splitlines()[2]
    cfg = load_config(path)
    assert cfg.model.trainable_encoders in ("none", "image", "text", "all")


@pytest.mark.parametrize("path", [p for p in CONFIGS if "accelerate" in p.parts], ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file" in text
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1


def test_all_accelerate_configs_shipped():
    names = {p.stem for p in CONFIGS if "accelerate" in p.parts}
    assert names == {
        "single_gpu",
        "multi_gpu",
        "fsdp",
        "deepspeed_zero2",
        "multi_node",
        "cpu_2proc",
        "cpu_2proc_fsdp",
    }


def test_fsdp_configs_are_fsdp2_with_a_unit_per_tower():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("fsdp", "cpu_2proc_fsdp"):
        path = Path(__file__).resolve().parents[1] / "recipes/configs/accelerate" / f"{name}.yaml"
        fsdp = load_config_from_file(str(path)).fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {"ImageEncoder", "TextEncoder"}


def test_refcoco_configs_differ_only_where_they_should():
    base = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "grounding"
    frozen = load_config(base / "refcoco_frozen.yaml")
    e2e = load_config(base / "refcoco_end_to_end.yaml")
    assert (frozen.model.trainable_encoders, e2e.model.trainable_encoders) == ("none", "all")
    assert frozen.data == e2e.data
    assert frozen.model.fusion == e2e.model.fusion
