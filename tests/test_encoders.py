import pytest
import timm
import torch
from safetensors.torch import save_file

from vlfuse.config import ImageEncoderConfig, TextEncoderConfig
from vlfuse.encoders import ImageEncoder, TextEncoder


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


def test_text_encoder_bad_name_is_clear():
    with pytest.raises(OSError, match="model.text_encoder.name"):
        TextEncoder(TextEncoderConfig(name="/definitely/not/here", pretrained=False))
    with pytest.raises(ValueError, match="no bundled encoder"):
        TextEncoder(TextEncoderConfig(name="vlfuse:nothing", pretrained=False))
