import pytest
import timm
import torch
from safetensors.torch import save_file

from vlfuse.encoders import ImageEncoder, TextEncoder
from vlfuse.schema import ImageEncoderConfig, TextEncoderConfig


def test_cnn_tokens_are_flattened_feature_map():
    enc = ImageEncoder(ImageEncoderConfig(name="test_resnet", pretrained=False, image_size=64))
    out = enc(torch.randn(2, 3, 64, 64))
    h, w = enc.grid
    assert out.tokens.shape == (2, h * w, enc.token_dim)
    assert out.pooled.shape == (2, enc.pooled_dim)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert enc.data_config["input_size"] == [3, 64, 64]


def test_vit_prefix_tokens_removed_and_other_size_works():
    # test_vit is built for 160 px by default; the encoder builds it for 64 px.
    enc = ImageEncoder(ImageEncoderConfig(name="test_vit", pretrained=False, image_size=64))
    assert enc.num_prefix_tokens >= 1
    out = enc(torch.randn(2, 3, 64, 64))
    patch = enc.model.patch_embed.patch_size[0]
    assert enc.grid == (64 // patch, 64 // patch)
    assert out.tokens.shape[1] == (64 // patch) ** 2


def test_unknown_timm_name_names_the_key():
    with pytest.raises(ValueError, match="model.image_encoder.name"):
        ImageEncoder(ImageEncoderConfig(name="no_such_net", pretrained=False, image_size=32))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_is_loaded(tmp_path, suffix):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    enc = ImageEncoder(
        ImageEncoderConfig(name="test_resnet", pretrained=True, checkpoint=str(path), image_size=64)
    )
    for name, tensor in source.state_dict().items():
        assert torch.equal(enc.model.state_dict()[name], tensor), name


def test_missing_checkpoint_names_the_key(tmp_path):
    cfg = ImageEncoderConfig(name="test_resnet", pretrained=True, checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="model.image_encoder.checkpoint"):
        ImageEncoder(cfg)


def test_text_encoder_from_local_folder_loads_weights(bert_folder):
    from transformers import BertModel

    reference = BertModel.from_pretrained(bert_folder)
    enc = TextEncoder(TextEncoderConfig(name=str(bert_folder), pretrained=True, max_length=8))
    assert enc.model.pooler is None  # unused under DDP: removed
    for name, tensor in enc.model.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor), name
    tokens = enc.tokenize(["the red circle", "a much longer expression that will be truncated for sure"])
    assert tokens["input_ids"].shape[1] == 8
    out = enc(**tokens)
    assert out.tokens.shape == (2, 8, 32) and out.pooled.shape == (2, 32)
    assert out.mask.dtype == torch.bool and not out.mask[0].all()
    # Every trainable parameter gets a gradient (the DDP trap is a parameter that does not).
    out.pooled.sum().backward()
    unused = [n for n, p in enc.named_parameters() if p.grad is None]
    assert unused == []


def test_text_encoder_config_overrides_reach_the_model_and_a_typo_is_named(bert_folder):
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg = TextEncoderConfig(name=str(bert_folder), pretrained=True, max_length=8, config_overrides=overrides)
    enc = TextEncoder(cfg)
    assert enc.model.config.hidden_dropout_prob == 0.0
    dropouts = [m.p for m in enc.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.0}
    # Without dropout, training mode computes what eval mode does.
    tokens = enc.tokenize(["the red circle", "the lowest blue shape"])
    enc.train()
    a = enc(**tokens).pooled
    enc.eval()
    assert torch.allclose(a, enc(**tokens).pooled, atol=1e-6)
    plain = TextEncoder(TextEncoderConfig(name=str(bert_folder), pretrained=True, max_length=8))
    assert {m.p for m in plain.model.modules() if isinstance(m, torch.nn.Dropout)} != {0.0}
    with pytest.raises(ValueError, match=r"config_overrides.*hiden_dropout_prob"):
        TextEncoder(TextEncoderConfig(name=str(bert_folder), config_overrides={"hiden_dropout_prob": 0.0}))


def test_text_encoder_bad_name_is_clear():
    with pytest.raises(OSError, match="model.text_encoder.name"):
        TextEncoder(TextEncoderConfig(name="/definitely/not/here", pretrained=False))
    with pytest.raises(ValueError, match="no bundled encoder"):
        TextEncoder(TextEncoderConfig(name="vlfuse:nothing", pretrained=False))


def _dual_tower_folder(root, family: str):
    """A tiny CLIP or SigLIP checkpoint (both towers) saved as a Hub snapshot would be, with a small
    tokenizer of our own (the bundled tiny BERT's)."""
    from transformers import BertTokenizer, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from vlfuse.encoders.text import resolve_text_encoder_name

    tokenizer = BertTokenizer.from_pretrained(resolve_text_encoder_name("vlfuse:tiny-bert"))
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(5)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    folder = root / family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.state_dict()


@pytest.mark.parametrize(("family", "cls"), [("clip", "CLIPTextModel"), ("siglip", "SiglipTextModel")])
def test_dual_tower_checkpoint_gives_its_text_tower(tmp_path, family, cls):
    folder, full = _dual_tower_folder(tmp_path, family)
    enc = TextEncoder(TextEncoderConfig(name=str(folder), pretrained=True, max_length=12))
    assert type(enc.model).__name__ == cls and enc.dim == 32
    state = enc.model.state_dict()
    # the checkpoint's text weights (stored under text_model. in the two-tower checkpoint), nothing else
    assert len(state) > 10 and all(torch.equal(full[f"text_model.{k}"], v) for k, v in state.items())
    if family == "siglip":
        assert enc.dropped_modules == ["head"]  # its pooled projection: never read
    else:
        assert enc.dropped_modules == []
    out = enc(**enc.tokenize(["a red circle", "two squares left of a triangle"]))
    assert out.tokens.shape[0] == 2 and out.pooled.shape == (2, 32)
    (out.tokens.sum() + out.pooled.sum()).backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []  # nothing unused under DDP


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_model_with_a_dual_tower_text_encoder_saves_and_reloads(tmp_path, family):
    from conftest import tiny_model_config

    from vlfuse.model import VLFuseModel

    folder, _ = _dual_tower_folder(tmp_path, family)
    cfg = tiny_model_config(
        f"model.text_encoder.name={folder}", "model.text_encoder.pretrained=true", "model.fusion.name=concat"
    )
    model = VLFuseModel(cfg).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved").eval()
    tokens = model.text_encoder.tokenize(["the red circle"])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            model(pixel_values=pixels, **tokens)["boxes"], loaded(pixel_values=pixels, **tokens)["boxes"]
        )


def test_transformers_private_auto_model_mapping_is_there():
    # vlfuse.encoders.text._text_model_class reads AutoModel._model_mapping (private): this fails when
    # transformers renames or removes it.
    from transformers import AutoModel, BertConfig, BertModel, SiglipTextConfig

    assert AutoModel._model_mapping[BertConfig] is BertModel
    assert SiglipTextConfig not in AutoModel._model_mapping  # the case the lookup exists for
