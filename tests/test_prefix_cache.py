"""The prefix cache: an image tower that trains only its last blocks reads its frozen blocks' output from
the feature cache. Training with it equals training without it (a CNN with BatchNorm in the prefix, a
ViT), resumes bitwise, is computed once for several trials and rebuilt for another cut; LoRA restricted
to the last blocks leaves the earlier ones without adapters and exports in peft's format."""

import copy
import json
import re

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_config
from helpers import train_until_crash_after_checkpoint
from safetensors.torch import load_file
from test_recipes import SMALL_DATA

from vlfuse.data.feature_cache import cached_dataset
from vlfuse.encoders.prefix import TowerSplit, split_tower
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.tasks.grounding import GroundingTask
from vlfuse.training import train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}


def _live_and_cached(tmp_path, capsys, common):
    """The run without and with the feature cache (same seed), and what the cached one printed."""
    live = train(tiny_config(*common, f"train.output_dir={tmp_path / 'live'}"))
    AcceleratorState._reset_state(True)
    capsys.readouterr()
    cached = train(
        tiny_config(*common, "train.cache_features=true", f"train.output_dir={tmp_path / 'cached'}")
    )
    return live, cached, capsys.readouterr().out


def _same_losses(tmp_path) -> dict[int, float]:
    """Asserts the cached run's per-step losses are the live run's within 1e-5; returns the cached ones."""
    a, b = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    return b


TOWERS = {
    # test_resnet: BatchNorm in the frozen prefix (eval mode, its statistics fixed) and in the trained block
    "test_resnet": ["model.image_encoder.name=test_resnet"],
    "test_vit": ["model.image_encoder.name=test_vit"],
}


def _common(tmp_path, tower, *extra):
    return [
        *SMALL_DATA,
        *TOWERS[tower],
        "model.fusion.name=transformer",
        "model.fusion.dropout=0.2",  # the same dropout draws with and without the cache
        # the text tower trains its last layer (live in both runs: a cached text tower would pad to
        # max_length, and the fusion's dropout masks would be drawn for other shapes)
        "model.trainable_encoders=all",
        "model.text_encoder.tuning=last_blocks",
        "model.image_encoder.tuning=last_blocks",
        "model.image_encoder.last_blocks=1",
        "train.log_every=1",
        "train.max_steps=6",
        "train.eval_every=6",
        "train.checkpoint_every=3",
        f"train.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("tower", list(TOWERS))
def test_prefix_cached_training_equals_live_and_resumes_bitwise(tmp_path, monkeypatch, capsys, tower):
    common = _common(tmp_path, tower)
    live, cached, out = _live_and_cached(tmp_path, capsys, common)
    boundary = {"test_resnet": "layer4.0", "test_vit": "blocks.5"}[tower]
    assert f"feature cache written (image tower's frozen prefix, entering {boundary})" in out
    assert "(text tower)" not in out  # it trains

    # Per-step losses and final weights within 1e-5 of the live run (float32, same seed).
    b = _same_losses(tmp_path)
    live_w = load_file(str(tmp_path / "live" / "final" / "model.safetensors"))
    cached_w = load_file(str(tmp_path / "cached" / "final" / "model.safetensors"))
    assert live_w.keys() == cached_w.keys()
    for k in live_w:
        torch.testing.assert_close(cached_w[k], live_w[k], atol=1e-5, rtol=0, msg=k)
    assert any(not torch.equal(live_w[k], v) for k, v in load_file(str(_init(tmp_path, tower))).items())
    for key, value in live["validation"].items():
        assert cached["validation"][key] == pytest.approx(value, abs=1e-5), key

    # A cached run killed after its step-3 checkpoint and resumed ends bitwise as the uninterrupted one.
    resumed = [*common, "train.cache_features=true", f"train.output_dir={tmp_path / 'resumed'}"]
    train_until_crash_after_checkpoint(monkeypatch, tiny_config(*resumed), step=3)
    AcceleratorState._reset_state(True)
    train(tiny_config(*resumed, "train.resume_from=latest"))
    again = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(again[k], cached_w[k]) for k in cached_w)
    assert _losses(tmp_path / "resumed") == b


def _init(tmp_path, tower):
    """The untrained model's weights (the same seed as the runs), to show that training moved them."""
    torch.manual_seed(0)
    model = VLFuseModel(tiny_config(*_common(tmp_path, tower)).model)
    path = tmp_path / "init.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _model(*overrides):
    cfg = tiny_config(
        *SMALL_DATA,
        "model.fusion.name=dense",
        "model.trainable_encoders=image",
        "model.image_encoder.tuning=last_blocks",
        *overrides,
    )
    torch.manual_seed(0)
    return cfg, VLFuseModel(cfg.model)


def _cache(tmp_path, *overrides, model=None, base=None):
    cfg, built = _model(*overrides)
    model = model or built
    base = base or GroundingTask().build_dataset(cfg, model, "validation", train=False)
    AcceleratorState._reset_state(True)
    return model, cached_dataset(
        model, base, "validation", tmp_path / "c", "float32", 8, Accelerator(cpu=True)
    )


def test_a_prefix_cache_serves_every_trial_of_one_cut_and_another_cut_gets_its_own(tmp_path, capsys):
    model, first = _cache(tmp_path, "model.image_encoder.last_blocks=1")
    out = capsys.readouterr().out
    assert re.search(r"feature cache written \(image tower's frozen prefix, entering layer4\.0\)", out)
    key = json.loads((first.folders["image"] / "cache.json").read_text())
    assert key["tower"] == "image_prefix" and key["prefix"]["boundary"] == "layer4.0"
    built = key["stats"]["build_time_s"]
    # Rows read the prefix's output: what the prefix computes on the live example's pixels.
    with torch.no_grad():
        model.train()
        expected = model.image_encoder.prefix(first.base[0].pixel_values[None])[0]
    row = first[0]
    assert row.pixel_values is None
    torch.testing.assert_close(row.features["image_prefix"], expected, atol=1e-6, rtol=1e-6)
    # Trials differ in rate and seed of the learnable block: their last block's weights differ, the
    # prefix does not, so every trial after the first reads the same folder (counted: 2 reused).
    for trial in range(2):
        _, model = _model("model.image_encoder.last_blocks=1")
        with torch.no_grad():
            for p in model.image_encoder.parameters():
                if p.requires_grad:
                    p.add_(0.1 * (trial + 1))
        _, again = _cache(tmp_path, "model.image_encoder.last_blocks=1", model=model, base=first.base)
        assert again.folders["image"] == first.folders["image"]
    out = capsys.readouterr().out
    assert out.count("feature cache reused (image tower's frozen prefix") == 2
    assert "feature cache written (image tower's frozen prefix" not in out
    assert json.loads((first.folders["image"] / "cache.json").read_text())["stats"]["build_time_s"] == built
    # Another cut (two learnable blocks) is another prefix: its own folder, built for it.
    _, other = _cache(tmp_path, "model.image_encoder.last_blocks=2")
    assert other.folders["image"] != first.folders["image"]
    assert "written (image tower's frozen prefix, entering layer3.0)" in capsys.readouterr().out
    # A folder whose key says another cut (as if written for it under this name) is rebuilt, saying why.
    meta = other.folders["image"] / "cache.json"
    stored = json.loads(meta.read_text())
    stored["prefix"]["boundary"] = "layer4.0"
    meta.write_text(json.dumps(stored))
    _cache(tmp_path, "model.image_encoder.last_blocks=2")
    out = capsys.readouterr().out
    assert re.search(
        r"feature cache rebuilt \(image tower's frozen prefix\).*differs in prefix\.boundary", out
    )


def test_a_tower_that_cannot_be_cut_says_why_and_runs_whole(tmp_path, capsys):
    # drop path makes the frozen blocks random in training: their output cannot be cached
    _, dataset = _cache(
        tmp_path, "model.image_encoder.name=test_vit", "model.image_encoder.kwargs.drop_path_rate=0.1"
    )
    assert "image" not in dataset.folders
    out = capsys.readouterr().out
    assert (
        "the image tower's frozen blocks are not cached (the prefix is not the same every step: DropPath"
        in out
    )


def test_split_tower_reproduces_forward_features_and_refuses_a_learnable_prefix():
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    learnable = {n for n, _ in model.named_parameters() if n.startswith("layer4.")}
    split = split_tower(model, learnable, 64)
    names = [u.name for u in split.prefix_units]  # a deep stem (conv1 a Sequential), then the blocks
    assert split.boundary == "layer4.0" and names[0] == "conv1.0" and names[-1] == "layer3.0"
    assert "maxpool" in names and "bn1" in names
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(split.suffix(split.prefix(x)), model.forward_features(x))
    assert "conv1.0.weight" in split.prefix_state
    assert not [n for n in split.prefix_state if n.startswith("layer4.")]
    # a learnable stem: nothing before it is frozen
    assert "no frozen prefix" in split_tower(model, {"conv1.0.weight"}, 64)
    # a model whose forward_features is not its modules in sequence
    assert "do not compute its forward_features" in split_tower(
        model, learnable, 64, forward_features=lambda x: model.forward_features(x) * 2
    )


def test_top_block_lora_adapts_only_the_last_blocks_and_exports_in_peft_format(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    cfg = tiny_config(
        "model.image_encoder.name=test_vit",
        "model.trainable_encoders=all",
        "model.image_encoder.tuning=lora",
        "model.image_encoder.lora.last_blocks=2",
        "model.text_encoder.tuning=lora",
        "model.text_encoder.lora.last_blocks=1",
    )
    model = VLFuseModel(cfg.model)
    blocks = model.image_encoder.blocks()
    adapted = {n.split(".lora_")[0] for n, _ in model.image_encoder.named_parameters() if ".lora_" in n}
    top = {n for block in blocks[-2:] for n in block}
    assert adapted and all(any(t.startswith(a + ".") for t in top) for a in adapted)
    earlier = {n for block in blocks[:-2] for n in block}
    assert not any(a + "." in n for a in adapted for n in earlier)
    assert {n.split(".lora_")[0] for n, _ in model.text_encoder.named_parameters() if ".lora_" in n} == {
        f"model.encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")
    }  # the 2-layer BERT: its last layer only
    assert isinstance(model.image_encoder.split(), TowerSplit)  # nothing learns before the last 2 blocks
    with torch.no_grad():  # non-zero updates, as after training
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    images = [Image.new("RGB", (50, 40), (200, 30, 30))]
    expected = model.predict(images, ["the red circle"])
    model.save_pretrained(tmp_path / "saved")
    adapter = json.loads(
        (tmp_path / "saved" / "adapters" / "image_encoder" / "adapter_config.json").read_text()
    )
    assert adapter["peft_type"] == "LORA" and sorted(adapter["target_modules"]) == sorted(
        a.removeprefix("model.") for a in adapted
    )
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    assert not loaded.image_encoder.has_adapters
    torch.testing.assert_close(loaded.predict(images, ["the red circle"]), expected, atol=1e-5, rtol=1e-5)


def test_settings_name_the_key():
    with pytest.raises(ConfigError, match="lora.last_blocks"):
        tiny_config("model.image_encoder.lora.last_blocks=0")
    with pytest.raises(ConfigError, match=r"model.image_encoder.lora.last_blocks=9, but the tower has"):
        VLFuseModel(
            tiny_config(
                "model.trainable_encoders=all",
                "model.image_encoder.tuning=lora",
                "model.image_encoder.lora.last_blocks=9",
            ).model
        )
    # the cache with both towers trained whole is refused; with either tower's top only it is not
    with pytest.raises(ConfigError, match="needs a frozen encoder or a tower that trains only its last"):
        tiny_config("train.cache_features=true", "model.trainable_encoders=all")
    for tower in ("image", "text"):
        tiny_config(
            "train.cache_features=true",
            "model.trainable_encoders=all",
            f"model.{tower}_encoder.tuning=last_blocks",
        )


def test_the_study_and_compare_use_the_prefix_cache_where_it_applies(tmp_path):
    from vlfuse.compare import mode_config
    from vlfuse.study.grid import Cell, trial_config

    cfg = tiny_config(*SMALL_DATA, "study.modes=[none,all,last_blocks,lora]")
    cached = {
        mode: trial_config(cfg, Cell(mode, 16.0, 0, 1e-3), tmp_path).train.cache_features
        for mode in cfg.study.modes
    }
    # a frozen tower (none), the image tower's frozen prefix (last_blocks); nothing for towers trained whole
    assert cached == {"none": True, "all": False, "last_blocks": True, "lora": False}
    top_lora = tiny_config(*SMALL_DATA, "model.image_encoder.lora.last_blocks=1")
    assert trial_config(top_lora, Cell("lora", 16.0, 0, 1e-3), tmp_path).train.cache_features
    top_text_lora = tiny_config(*SMALL_DATA, "model.text_encoder.lora.last_blocks=1")
    assert trial_config(top_text_lora, Cell("lora", 16.0, 0, 1e-3), tmp_path).train.cache_features
    on = tiny_config(*SMALL_DATA, "train.cache_features=true")
    assert (
        mode_config(on, "last_blocks").train.cache_features
        and not mode_config(on, "all").train.cache_features
    )


@pytest.mark.slow
def test_a_study_computes_the_prefix_once_for_all_its_last_blocks_trials(tmp_path, capsys):
    from vlfuse.study import run_study

    cfg = tiny_config(
        *SMALL_DATA,
        "data.shapes_train_size=60",
        "model.fusion.name=dense",
        "train.max_steps=2",
        "train.eval_every=2",
        f"train.cache_dir={tmp_path / 'cache'}",
        "study.modes=[last_blocks]",
        "study.train_sizes=[16]",
        "study.seeds=[0]",
        "study.validation=12",
        "study.lr_grid={last_blocks: [0.001, 0.003]}",
        f"train.output_dir={tmp_path / 'study'}",
    )
    result = run_study(cfg)
    assert result["complete"] and result["trials"] == 2
    out = capsys.readouterr().out
    # one folder for the train split (its held-out rows read it too) and one for the report split, each
    # written once (by the first trial); the second trial reads all three splits from them
    written = re.findall(r"feature cache written \(image tower's frozen prefix", out)
    reused = re.findall(r"feature cache reused \(image tower's frozen prefix", out)
    assert len(written) == len(list((tmp_path / "cache").glob("*-image_prefix-*"))) == 2
    assert len(reused) == 1 + 3


# ------------------------------------------------------------------------------------ LoRA and BN at speed
def _peft_layers(kind):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    if kind == "linear":
        net = torch.nn.Sequential(torch.nn.Linear(12, 10))
        x = torch.randn(3, 5, 12, requires_grad=True)
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1))
        x = torch.randn(2, 4, 9, 9, requires_grad=True)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0"]), net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero update
            p.requires_grad_("lora_" in name)
    return net, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_fast_lora_layer_computes_what_peft_computes(kind):
    from peft.tuners.lora import LoraLayer

    from vlfuse.encoders.fast import FAST_LORA, use_fast_lora

    results = []
    for fast in (False, True):
        net, x = _peft_layers(kind)
        layer = net[0]
        assert isinstance(layer, LoraLayer) and type(layer) in FAST_LORA  # peft's classes, as named here
        for attr in (
            "lora_A",
            "lora_B",
            "scaling",
            "lora_dropout",
            "active_adapters",
            "merged",
            "get_delta_weight",
        ):
            assert hasattr(layer, attr), attr  # what the fast path reads: fails if peft renames it
        if fast:
            assert use_fast_lora(net) == 1 and type(net[0]).__name__.startswith("Fast")
        out = net(x)
        out.square().sum().backward()
        grads = [x.grad] + [p.grad for p in net.parameters() if p.requires_grad]
        # evaluation (eval mode, no gradient): the fast layer runs the base layer once with the merged
        # weight (its adapter's own layers do not run) and leaves the module's weights as they were
        calls = []
        net[0].lora_A["default"].register_forward_hook(lambda *_, calls=calls: calls.append(1))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            evaluated = net.eval()(x)
        assert len(calls) == (0 if fast else 1)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        results.append((out.detach(), grads, evaluated))
    (out, grads, evaluated), (fast_out, fast_grads, fast_evaluated) = results
    torch.testing.assert_close(fast_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_evaluated, evaluated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(evaluated, out, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # with dropout the fast path steps aside (peft's own forward draws the mask)
    from peft import LoraConfig, inject_adapter_in_model

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_adapter_in_model(LoraConfig(r=2, lora_dropout=0.5, target_modules=["0"]), net)
    use_fast_lora(net)
    torch.manual_seed(1)
    a = net(torch.ones(2, 4))
    net[0].__class__ = type(net[0]).__mro__[1]  # back to peft's class
    torch.manual_seed(1)
    torch.testing.assert_close(net(torch.ones(2, 4)), a)


@pytest.mark.parametrize("kind", ["torch", "timm"])
def test_a_frozen_batchnorm_runs_as_an_affine_map_and_trains_as_before(kind):
    from timm.layers import BatchNormAct2d

    from vlfuse.encoders.fast import FrozenBatchNorm2d, FrozenBatchNormAct2d, frozen_batchnorm_as_affine

    torch.manual_seed(0)
    # timm's norm + activation (MobileNetV2's ReLU6, in place as timm builds it)
    plain = torch.nn.BatchNorm2d(5) if kind == "torch" else BatchNormAct2d(5, act_layer=torch.nn.ReLU6)
    with torch.no_grad():
        plain.running_mean.normal_()
        plain.running_var.uniform_(0.5, 2)
        plain.weight.normal_()
        plain.bias.normal_()
    fast = torch.nn.Sequential(copy.deepcopy(plain))
    assert frozen_batchnorm_as_affine(fast) == 1
    assert isinstance(fast[0], FrozenBatchNorm2d if kind == "torch" else FrozenBatchNormAct2d)
    assert fast[0].state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 5, 4, 4)
    for m in (plain, fast[0]):
        m.eval().requires_grad_(False)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [plain(xs[0]), fast(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-5, rtol=1e-5)
    # trainable or in training mode it is an ordinary BatchNorm: the same output bitwise, statistics move
    for m in (plain, fast[0]):
        m.train().requires_grad_(True)
    assert torch.equal(fast(x), plain(x)) and torch.equal(fast[0].running_mean, plain.running_mean)


def test_a_text_tower_with_dropout_in_its_frozen_layers_says_why_and_runs_whole(tmp_path, capsys):
    # tiny-bert's config has dropout 0.1: a frozen layer keeps it in training, so its output is random
    _, dataset = _cache(
        tmp_path,
        "model.trainable_encoders=all",
        "model.text_encoder.tuning=last_blocks",
        "model.text_encoder.last_blocks=1",
    )
    assert set(dataset.folders) == {"image"}
    out = capsys.readouterr().out
    assert (
        "the text tower's frozen blocks are not cached (the prefix is not the same every step: Dropout "
        "(rate 0.1) at embeddings.dropout" in out
    )
    assert "written (image tower's frozen prefix" in out


NO_TEXT_DROPOUT = (
    'model.text_encoder.config_overrides={"hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}'
)


@pytest.mark.parametrize("recompute", [False, True])
def test_text_prefix_cached_training_equals_live(tmp_path, capsys, recompute):
    # Both towers train their last block; the text tower without dropout, so its frozen layer is the
    # same every step. The transformer fusion's dropout draws the same masks only if the cached text
    # batch is as wide as the live one: padding columns are dropped before the learnable layer runs.
    # With activation checkpointing the learnable layer is recomputed in the backward pass: from the
    # cached hidden state it was given as its input. (A ViT there: a ResNet's trained BatchNorm would
    # count its recomputed batches in the live run.)
    common = [
        *_common(tmp_path, "test_vit" if recompute else "test_resnet", NO_TEXT_DROPOUT),
        "model.text_encoder.last_blocks=1",
        "train.checkpoint_every=null",
        f"train.gradient_checkpointing={str(recompute).lower()}",
    ]
    live, cached, out = _live_and_cached(tmp_path, capsys, common)
    assert "feature cache written (text tower's frozen prefix, entering encoder.layer.1)" in out
    assert "feature cache written (image tower's frozen prefix, entering " in out
    _same_losses(tmp_path)
    live_w = load_file(str(tmp_path / "live" / "final" / "model.safetensors"))
    cached_w = load_file(str(tmp_path / "cached" / "final" / "model.safetensors"))
    for k in live_w:
        a_k, b_k = live_w[k], cached_w[k]
        if k.endswith("self_attn.in_proj_bias"):
            # The key bias's true gradient is 0 (softmax ignores a shift shared by every key): Adam
            # scales the ~1e-12 rounding noise left in it to full steps, whose signs are arbitrary.
            d = a_k.numel() // 3
            a_k, b_k = torch.cat([a_k[:d], a_k[2 * d :]]), torch.cat([b_k[:d], b_k[2 * d :]])
        torch.testing.assert_close(b_k, a_k, atol=1e-5, rtol=0, msg=k)
    for key, value in live["validation"].items():
        assert cached["validation"][key] == pytest.approx(value, abs=1e-5), key


def test_split_text_tower_resumes_the_forward_and_refuses_what_it_cannot_cut():
    from transformers import BertConfig, BertModel, BertTokenizer

    from vlfuse.encoders.text import resolve_text_encoder_name
    from vlfuse.encoders.text_prefix import split_text_tower

    tokenizer = BertTokenizer.from_pretrained(resolve_text_encoder_name("vlfuse:tiny-bert"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    names = [n for n, _ in model.named_parameters()]
    blocks = [[n for n in names if not n.startswith("encoder.layer.")]] + [
        [n for n in names if n.startswith(f"encoder.layer.{i}.")] for i in range(3)
    ]
    split = split_text_tower(model, "encoder.layer", blocks, set(blocks[3]), tokenizer)
    assert split.boundary == "encoder.layer.2"
    assert not [n for n in split.prefix_state if n.startswith("encoder.layer.2.")]
    assert "encoder.layer.1.output.dense.weight" in split.prefix_state
    assert "embeddings.word_embeddings.weight" in split.prefix_state
    ids = tokenizer(["one two three four", "five"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).last_hidden_state
        hidden = split.prefix(model, ids["input_ids"], ids["attention_mask"])
        got = split.suffix(model, hidden, ids["attention_mask"])
        # the prefix is the input of layer 2: layers 0 and 1 run on the embeddings
        manual = model.embeddings(input_ids=ids["input_ids"])
        torch.testing.assert_close(hidden[0], model.encoder.layer[1](model.encoder.layer[0](manual))[0])
    keep = ids["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-6, rtol=1e-6)
    assert "embeddings learn" in split_text_tower(model, "encoder.layer", blocks, set(names), tokenizer)
    assert "first layer" in split_text_tower(model, "encoder.layer", blocks, set(blocks[1]), tokenizer)
    dropout = BertModel(
        BertConfig(**{**config.to_dict(), "hidden_dropout_prob": 0.1}), add_pooling_layer=False
    )
    assert "Dropout (rate 0.1)" in split_text_tower(
        dropout, "encoder.layer", blocks, set(blocks[3]), tokenizer
    )

    class KeywordLayers(torch.nn.Module):  # layers called with another keyword: the forward cannot be resumed
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(tokenizer.vocab_size, 8)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(input=x)
            return type("Out", (), {"last_hidden_state": x})()

    odd = KeywordLayers()
    odd_blocks = [["embed.weight"]] + [[f"layers.{i}.weight", f"layers.{i}.bias"] for i in range(3)]
    reason = split_text_tower(odd, "layers", odd_blocks, set(odd_blocks[3]), tokenizer)
    assert "cannot be resumed at layers.2" in reason


def _family(name: str, vocab: int):
    import transformers as tf

    small = {"vocab_size": vocab, "num_attention_heads": 2}
    layers = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "max_position_embeddings": 64,
    }
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if name == "clip":
        return tf.CLIPTextModel(tf.CLIPTextConfig(**small, **layers)), "encoder.layers"
    if name == "siglip":
        return tf.SiglipTextModel(tf.SiglipTextConfig(**small, **layers)), "encoder.layers"
    if name == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=vocab, dim=32, hidden_dim=64, n_layers=3, n_heads=2, dropout=0.0, attention_dropout=0.0
        )
        return tf.DistilBertModel(config), "transformer.layer"
    config = tf.RobertaConfig(**small, **layers, **no_dropout, pad_token_id=0)
    return tf.RobertaModel(config, add_pooling_layer=False), "encoder.layer"


@pytest.mark.parametrize("family", ["clip", "siglip", "distilbert", "roberta"])
def test_other_text_encoder_families_resume_their_forward_at_the_cut(family):
    # each builds its mask and layer arguments its own way (CLIP a causal mask, DistilBERT its own layer call)
    from transformers import BertTokenizer

    from vlfuse.encoders.text import resolve_text_encoder_name
    from vlfuse.encoders.text_prefix import split_text_tower
    from vlfuse.encoders.tuning import blocks_by_prefix

    tokenizer = BertTokenizer.from_pretrained(resolve_text_encoder_name("vlfuse:tiny-bert"))
    torch.manual_seed(0)
    model, stack = _family(family, tokenizer.vocab_size)
    model.eval()
    blocks = blocks_by_prefix([n for n, _ in model.named_parameters()], stack, 3)
    split = split_text_tower(model, stack, blocks, set(blocks[3]), tokenizer)
    assert not isinstance(split, str), split
    assert split.boundary == f"{stack}.2"
    ids = tokenizer(["a small red circle left of a square", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).last_hidden_state
        got = split.suffix(
            model, split.prefix(model, ids["input_ids"], ids["attention_mask"]), ids["attention_mask"]
        )
    keep = ids["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
