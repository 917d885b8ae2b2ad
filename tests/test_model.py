import pytest
import torch
from conftest import tiny_model_config
from PIL import Image

from vlfuse.model import VLFuseModel

PREFIXES = {
    "none": ("fusion.", "head."),
    "image": ("fusion.", "head.", "image_encoder."),
    "text": ("fusion.", "head.", "text_encoder."),
    "all": ("fusion.", "head.", "image_encoder.", "text_encoder."),
}


def _batch(model, b=4):
    texts = [
        "the red circle",
        "the small square left of the blue triangle",
        "the lowest shape",
        "the green one",
    ][:b]
    return {"pixel_values": torch.randn(b, 3, 64, 64), **model.text_encoder.tokenize(texts)}


@pytest.fixture(scope="module")
def base_model():
    return VLFuseModel(tiny_model_config("model.fusion.name=dense"))


@pytest.mark.parametrize("mode", ["none", "image", "text", "all"])
def test_exact_trainable_names(base_model, mode):
    model = base_model.set_trainable_encoders(mode)
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if n.startswith(PREFIXES[mode])}
    assert model.trainable_parameter_names() == expected
    assert any(n.startswith("image_encoder.") for n in names) and any(n.startswith("fusion.") for n in names)
    # Idempotent, and reversible from any state.
    model.set_trainable_encoders(mode)
    assert model.trainable_parameter_names() == expected
    model.set_trainable_encoders("all")
    model.set_trainable_encoders(mode)
    assert model.trainable_parameter_names() == expected


@pytest.mark.parametrize("mode", ["none", "image", "text", "all"])
def test_param_groups_hold_only_trainable(base_model, mode):
    model = base_model.set_trainable_encoders(mode)
    groups = model.param_groups(lr=1e-3, encoder_lr=1e-5, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    encoder_ids = {id(p) for p in model.image_encoder.parameters()} | {
        id(p) for p in model.text_encoder.parameters()
    }
    for g in groups:
        in_encoder = {id(p) in encoder_ids for p in g["params"]}
        assert len(in_encoder) == 1
        assert g["lr"] == (1e-5 if in_encoder.pop() else 1e-3)
    has_encoder_group = any(g["name"].startswith("encoders") for g in groups)
    assert has_encoder_group == (mode != "none")


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["none", "image", "text", "all"])
def test_frozen_towers_bit_identical_after_training(mode):
    model = VLFuseModel(tiny_model_config("model.fusion.name=dense", f"model.trainable_encoders={mode}"))
    model.train()
    before = {"image": _snapshot(model.image_encoder), "text": _snapshot(model.text_encoder)}
    frozen = set(model.frozen_towers())
    for tower in frozen:
        assert not getattr(model, f"{tower}_encoder").training  # eval() survives model.train()
    opt = torch.optim.AdamW(model.param_groups(1e-2, 1e-2, 0.0))
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    for _ in range(3):
        batch = _batch(model)
        out = model(**batch)
        out["boxes"].sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    for tower in ("image", "text"):
        encoder = getattr(model, f"{tower}_encoder")
        after = _snapshot(encoder)
        same = all(torch.equal(before[tower][k], after[k]) for k in after)
        if tower in frozen:
            assert same, f"frozen {tower} tower changed"
            assert all(p.grad is None for p in encoder.parameters())
            assert not any(id(p) in optimized for p in encoder.parameters())
        else:
            assert not same, f"trainable {tower} tower did not change"
    if "image" not in frozen:
        # BatchNorm running stats move when the CNN trains: the check above can fail.
        bn = [k for k in before["image"] if k.endswith("running_mean")]
        assert bn and any(
            not torch.equal(before["image"][k], model.image_encoder.state_dict()[k]) for k in bn
        )


def test_frozen_forward_builds_no_graph():
    model = VLFuseModel(tiny_model_config("model.trainable_encoders=none"))
    batch = _batch(model, 2)
    image = model.encode_image(batch["pixel_values"])
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert image.tokens.grad_fn is None and text.tokens.grad_fn is None
    model.set_trainable_encoders("all")
    assert model.encode_image(batch["pixel_values"]).tokens.grad_fn is not None


@pytest.mark.parametrize("fusion", ["concat", "transformer", "dense"])
def test_save_load_round_trip(tmp_path, fusion):
    model = VLFuseModel(tiny_model_config(f"model.fusion.name={fusion}", "model.trainable_encoders=all"))
    # Train a step so that the weights differ from any fresh init.
    opt = torch.optim.SGD(model.param_groups(0.1, 0.1), lr=0.1)
    model.train()
    model(**_batch(model))["boxes"].sum().backward()
    opt.step()
    model.eval()
    batch = _batch(model)
    expected = model(**batch)["boxes"]
    model.save_pretrained(tmp_path / "saved")
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(loaded(**batch)["boxes"], expected)
    assert loaded.config == model.config
    images = [Image.new("RGB", (120, 60), (10, 200, 30)), Image.new("RGB", (40, 90))]
    assert torch.equal(
        loaded.predict(images, ["the red circle", "the blue one"]),
        model.predict(images, ["the red circle", "the blue one"]),
    )


def test_from_pretrained_is_self_contained(tmp_path, bert_folder):
    # The text tower came from a local folder; after saving, that folder is gone and loading still works.
    import shutil

    source = tmp_path / "bert_copy"
    shutil.copytree(bert_folder, source)
    model = VLFuseModel(
        tiny_model_config(f"model.text_encoder.name={source}", "model.text_encoder.pretrained=true")
    )
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(source)
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlfuse_config.json"):
        VLFuseModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        VLFuseModel.from_pretrained(tmp_path / "missing")


def test_predict_boxes_in_original_pixels():
    model = VLFuseModel(tiny_model_config("model.fusion.name=dense"))
    boxes = model.predict([Image.new("RGB", (200, 50)), Image.new("RGB", (30, 90))], ["a", "b"])
    assert boxes.shape == (2, 4)
    assert (boxes[:, 2] <= torch.tensor([200.0, 30.0])).all() and (
        boxes[:, 3] <= torch.tensor([50.0, 90.0])
    ).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
