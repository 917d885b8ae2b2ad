"""How a trainable tower learns: full, LoRA (peft) or the last blocks; exact trainable sets, frozen parts
left bit-identical (BatchNorm statistics too), merged LoRA saved and reloaded, and the config errors."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_config, tiny_model_config
from helpers import train_until_crash_after_checkpoint
from test_recipes import SMALL_DATA

from vlfuse.config import load_config
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.training import train

VIT = "model.image_encoder.name=test_vit"


def _model(*overrides):
    return VLFuseModel(
        tiny_model_config("model.fusion.name=concat", "model.trainable_encoders=all", *overrides)
    )


def _learning(model, tower):
    return {n for n in model.trainable_parameter_names() if n.startswith(f"{tower}_encoder.")}


def _tower_names(model, tower):
    return {n for n, _ in model.named_parameters() if n.startswith(f"{tower}_encoder.")}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ------------------------------------------------------------------------------------- exact trainable sets
@pytest.mark.parametrize(
    ("overrides", "tower", "prefixes"),
    [
        # timm CNN with BatchNorm: timm's blocks are its stages (layer1..layer4), after the stem
        (("model.image_encoder.tuning=last_blocks",), "image", ("layer4.",)),
        (
            ("model.image_encoder.tuning=last_blocks", "model.image_encoder.last_blocks=2"),
            "image",
            ("layer3.", "layer4."),
        ),
        # timm ViT: its blocks, the final norm with the last one
        (
            (VIT, "model.image_encoder.tuning=last_blocks", "model.image_encoder.last_blocks=2"),
            "image",
            ("blocks.4.", "blocks.5.", "norm."),
        ),
        # BERT-like: the last encoder layer; embeddings frozen
        (("model.text_encoder.tuning=last_blocks",), "text", ("encoder.layer.1.",)),
    ],
)
def test_last_blocks_trainable_names(overrides, tower, prefixes):
    model = _model(*overrides)
    expected = {n for n in _tower_names(model, tower) if n.split("model.", 1)[1].startswith(prefixes)}
    assert expected and _learning(model, tower) == expected
    other = "text" if tower == "image" else "image"
    assert _learning(model, other) == _tower_names(model, other)  # the other tower: full, as configured
    assert {n for n in model.trainable_parameter_names() if n.startswith(("fusion.", "head."))}


@pytest.mark.parametrize(
    ("overrides", "tower", "per_module"),
    [
        # ViT: qkv Linear(64 -> 192) in each of 6 blocks: r * (64 + 192)
        (
            (VIT, "model.image_encoder.tuning=lora", "model.image_encoder.lora.r=4"),
            "image",
            {"qkv": 4 * (64 + 192)},
        ),
        # BERT: query, key, value Linear(128 -> 128) in each of 2 layers: r * (128 + 128)
        (("model.text_encoder.tuning=lora",), "text", {"query": 8 * 256, "key": 8 * 256, "value": 8 * 256}),
        (
            ("model.text_encoder.tuning=lora", "model.text_encoder.lora.target_modules=[value]"),
            "text",
            {"value": 8 * 256},
        ),
    ],
)
def test_lora_trains_exactly_the_adapters(overrides, tower, per_module):
    model = _model(*overrides)
    learning = _learning(model, tower)
    assert learning and all(".lora_A." in n or ".lora_B." in n for n in learning)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in learning}
    assert adapted == set(per_module)
    blocks = 6 if tower == "image" else 2
    expected = blocks * sum(per_module.values())
    assert sum(p.numel() for n, p in model.named_parameters() if n in learning) == expected
    counts = model.parameter_counts()[f"{tower}_encoder"]
    assert counts["trainable"] == expected and counts["frozen"] > 0


def test_lora_on_a_cnn_adapts_its_convolutions():
    model = _model("model.image_encoder.tuning=lora", "model.image_encoder.lora.r=2")
    convs = [
        n
        for n, m in model.image_encoder.model.named_modules()
        if type(m).__name__ == "Conv2d" and ".lora_" in n
    ]
    assert convs  # lora_A / lora_B are convolutions too
    learning = _learning(model, "image")
    # lora_A: [r, in, k, k]; lora_B: [out, r, 1, 1] for every adapted conv
    total = 0
    for module in model.image_encoder.model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            base = module.base_layer
            k = base.kernel_size[0] * base.kernel_size[1]
            total += 2 * base.in_channels * k + base.out_channels * 2
    assert sum(p.numel() for n, p in model.named_parameters() if n in learning) == total


def test_frozen_parts_and_batchnorm_statistics_stay_bit_identical():
    torch.manual_seed(0)
    model = _model("model.image_encoder.tuning=last_blocks", "model.text_encoder.tuning=lora").train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, 1e-2))
    tokens = model.text_encoder.tokenize(["the red circle", "a blue square", "two shapes", "the left one"])
    for _ in range(3):
        out = model(pixel_values=torch.randn(4, 3, 64, 64), **tokens)
        out["boxes"].sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    learning = model.trainable_parameter_names()
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    image_stem = {k for k in start if k.startswith("image_encoder.model.") and ".layer4." not in k}
    assert not (moved & image_stem), sorted(moved & image_stem)[:5]  # weights and BN buffers of the stem
    assert any(
        k.startswith("image_encoder.model.layer4.") and "running_mean" in k for k in moved
    )  # trainable BN
    text_base = {k for k in start if k.startswith("text_encoder.") and ".lora_" not in k}
    assert not (moved & text_base)
    assert {k for k in moved if k.startswith("text_encoder.")} <= {
        k for k in learning if ".lora_B." in k or ".lora_A." in k
    }
    assert any(".lora_B." in k for k in moved)


# ------------------------------------------------------------------------------------------ save / load
def test_lora_merged_on_save_predicts_identically_without_adapters(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = _model(VIT, "model.image_encoder.tuning=lora", "model.text_encoder.tuning=lora")
    with torch.no_grad():  # non-zero updates, as after training
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 20, 200))]
    texts = ["the red circle", "the lowest shape"]
    expected = model.predict(images, texts)
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "vlfuse_config.json").read_text())
    assert meta["lora_merged"] == ["image_encoder", "text_encoder"]
    # each tower's adapter in peft's own format (adapters/<tower>/)
    adapter = json.loads(
        (tmp_path / "saved" / "adapters" / "image_encoder" / "adapter_config.json").read_text()
    )
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert adapter["target_modules"] and all(t.endswith("qkv") for t in adapter["target_modules"])
    assert (tmp_path / "saved" / "adapters" / "text_encoder" / "adapter_model.safetensors").is_file()
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    assert not loaded.image_encoder.has_adapters and not loaded.text_encoder.has_adapters  # plain layers
    torch.testing.assert_close(loaded.predict(images, texts), expected, atol=1e-5, rtol=1e-5)
    # made trainable again, a merged tower gets fresh adapters (zero update): the outputs do not change
    loaded.set_trainable_encoders("all")
    assert loaded.text_encoder.has_adapters
    torch.testing.assert_close(loaded.predict(images, texts), expected, atol=1e-5, rtol=1e-5)


def test_lora_run_resumes_exactly(tmp_path, monkeypatch):
    common = [
        *SMALL_DATA,
        "model.fusion.name=concat",
        "model.trainable_encoders=all",
        "model.text_encoder.tuning=lora",
        "model.image_encoder.tuning=last_blocks",
        "train.checkpoint_every=2",
        "train.max_steps=4",
    ]
    train(tiny_config(*common, f"train.output_dir={tmp_path / 'straight'}"))
    AcceleratorState._reset_state(True)
    train_until_crash_after_checkpoint(
        monkeypatch, tiny_config(*common, f"train.output_dir={tmp_path / 'resumed'}"), 2
    )
    AcceleratorState._reset_state(True)
    train(tiny_config(*common, f"train.output_dir={tmp_path / 'resumed'}", "train.resume_from=latest"))
    from safetensors.torch import load_file

    straight = load_file(str(tmp_path / "straight" / "checkpoints" / "step_4" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_4" / "model.safetensors"))
    assert straight.keys() == resumed.keys() and any(".lora_A." in k for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["tuning"] == {"image": "last_blocks", "text": "lora"}
    assert summary["parameters"]["text_encoder"]["trainable"] == 2 * 3 * 8 * 256


# ------------------------------------------------------------------------------------------ config errors
def test_a_bad_tuning_names_the_key():
    with pytest.raises(ConfigError, match="'model.image_encoder.tuning'; allowed: full, lora, last_blocks"):
        load_config(overrides=["model.image_encoder.tuning=half"])
    with pytest.raises(ConfigError, match="'model.text_encoder.lora.r'; must be >= 1"):
        load_config(overrides=["model.text_encoder.lora.r=0"])


def test_too_many_blocks_names_the_key_and_the_count():
    with pytest.raises(ConfigError, match="model.image_encoder.last_blocks=9, but the tower has 4 blocks"):
        _model("model.image_encoder.tuning=last_blocks", "model.image_encoder.last_blocks=9")
    with pytest.raises(ConfigError, match="model.text_encoder.last_blocks=3, but the tower has 2 blocks"):
        _model("model.text_encoder.tuning=last_blocks", "model.text_encoder.last_blocks=3")


def test_target_modules_that_match_nothing_name_the_key():
    with pytest.raises(
        ConfigError, match=r"model.text_encoder.lora.target_modules: \['nope'\] match no module"
    ):
        _model("model.text_encoder.tuning=lora", "model.text_encoder.lora.target_modules=[nope]")


def test_compare_accepts_the_middle_modes():
    from vlfuse.compare import mode_config

    cfg = tiny_config("compare.modes=[none,lora,last_blocks,all]", "train.cache_features=true")
    lora = mode_config(cfg, "lora")
    assert lora.model.trainable_encoders == "all" and lora.model.image_encoder.tuning == "lora"
    assert lora.model.text_encoder.tuning == "lora" and not lora.train.cache_features
    assert mode_config(cfg, "none").train.cache_features
    with pytest.raises(ConfigError, match="compare.modes"):
        tiny_config("compare.modes=[none,half]")


def test_lora_with_gradient_checkpointing_and_bf16_trains(tmp_path):
    metrics = train(
        tiny_config(
            *SMALL_DATA,
            "model.fusion.name=transformer",
            "model.trainable_encoders=all",
            "model.image_encoder.name=test_vit",
            "model.image_encoder.tuning=lora",
            "model.text_encoder.tuning=lora",
            "train.gradient_checkpointing=true",
            "train.mixed_precision=bf16",
            "train.max_steps=2",
            f"train.output_dir={tmp_path}",
        )
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert 0 <= metrics["validation"]["acc@0.5"] <= 1
    assert summary["parameters"]["image_encoder"]["trainable"] == 6 * 8 * (64 + 192)  # qkv adapters only
    assert not VLFuseModel.from_pretrained(tmp_path / "final").image_encoder.has_adapters  # merged


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_with_lora_and_last_blocks(tmp_path):
    """DDP without find_unused_parameters: ranks stay identical, frozen parts never move."""
    from conftest import TINY_MODEL
    from safetensors.torch import load_file
    from test_recipes import launch

    args = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        "model.trainable_encoders=all",
        "model.image_encoder.tuning=last_blocks",
        "model.text_encoder.tuning=lora",
        f"train.output_dir={tmp_path}",
        "train.max_steps=3",
        "train.seed=3",
    ]
    launch("../tests/scripts/grounding_dump_ranks.py", *args, processes=2)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(3)
    start = VLFuseModel(tiny_config(*args).model).state_dict()
    moved = {k for k in start if not torch.equal(start[k], rank0[k])}
    assert moved and all(
        k.startswith(("fusion.", "head.", "image_encoder.model.layer4.")) or ".lora_" in k for k in moved
    ), sorted(moved)[:8]
    assert any(".lora_B." in k for k in moved) and any(
        k.startswith("image_encoder.model.layer4.") for k in moved
    )


def test_lora_leaves_dilated_convolutions_alone_and_refuses_them_by_name():
    # output_stride 8 dilates the last stages' convolutions; peft's conv adapter ignores dilation
    dilated = ["model.image_encoder.kwargs={output_stride: 8}", "model.image_encoder.tuning=lora"]
    model = _model(*dilated, "model.image_encoder.lora.r=2")
    adapted = [
        m for n, m in model.image_encoder.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    ]
    assert adapted and all(tuple(m.base_layer.dilation) == (1, 1) for m in adapted)
    out = model.image_encoder(torch.zeros(2, 3, 64, 64))  # every adapted layer keeps its output shape
    assert out.tokens.shape[1] == 64
    dilated_name = next(
        n
        for n, m in model.image_encoder.model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and tuple(m.dilation) != (1, 1)
    )
    with pytest.raises(ConfigError, match="dilated convolutions"):
        _model(*dilated, f"model.image_encoder.lora.target_modules=[{dilated_name.split('.base_layer')[0]}]")
