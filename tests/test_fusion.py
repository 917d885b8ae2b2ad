import pytest
import torch

from vlfuse.encoders import EncoderOutput
from vlfuse.fusion import FUSION_HEADS, TowerShape, build_fusion
from vlfuse.schema import FusionConfig


def _inputs(b=3, grid=(4, 5), c_img=24, c_txt=16, n_txt=7):
    image = EncoderOutput(
        tokens=torch.randn(b, grid[0] * grid[1], c_img, requires_grad=True),
        pooled=torch.randn(b, c_img, requires_grad=True),
        grid=grid,
    )
    mask = torch.ones(b, n_txt, dtype=torch.bool)
    mask[0, 4:] = False
    text = EncoderOutput(
        tokens=torch.randn(b, n_txt, c_txt, requires_grad=True), pooled=torch.randn(b, c_txt), mask=mask
    )
    return image, text, TowerShape(c_img, c_img, grid[0] * grid[1], grid), TowerShape(c_txt, c_txt, 10)


@pytest.mark.parametrize("name", sorted(FUSION_HEADS))
def test_shapes_and_gradients(name):
    image, text, ishape, tshape = _inputs()
    cfg = FusionConfig(name=name, dim=32, num_layers=2, num_heads=4, dropout=0.0)
    head = build_fusion(cfg, ishape, tshape, max_text_len=10)
    out = head(image, text)
    if head.output_kind == "vector":
        assert out.vector.shape == (3, 32)
        loss = out.vector.pow(2).sum()
    elif head.output_kind == "embedding":
        assert out.image.shape == (3, 32) and out.text.shape == (3, 32)
        loss = (out.image * out.text).sum()
    else:
        assert out.dense.shape == (3, 32, 4, 5)
        loss = out.dense.pow(2).sum()
    loss.backward()
    assert image.pooled.grad is not None or image.tokens.grad is not None
    no_grad = [n for n, p in head.named_parameters() if p.grad is None]
    assert no_grad == [], no_grad


def test_transformer_ignores_text_padding():
    image, text, ishape, tshape = _inputs()
    head = build_fusion(
        FusionConfig(name="transformer", dim=32, num_layers=2, num_heads=4, dropout=0.0), ishape, tshape, 10
    )
    head.eval()
    before = head(image, text).vector[0]
    text.tokens.data[0, 4:] = 100.0  # padded positions of sample 0
    after = head(image, text).vector[0]
    assert torch.allclose(before, after, atol=1e-5)


def test_transformer_accepts_another_grid():
    image, text, ishape, tshape = _inputs(grid=(4, 5))
    head = build_fusion(
        FusionConfig(name="transformer", dim=32, num_layers=1, num_heads=4), ishape, tshape, 10
    )
    other, _, _, _ = _inputs(grid=(6, 6))
    assert head(other, text).vector.shape == (3, 32)


def test_unknown_fusion_name():
    _, _, ishape, tshape = _inputs()
    cfg = FusionConfig(dim=32)
    cfg.name = "nope"
    with pytest.raises(ValueError, match="model.fusion.name"):
        build_fusion(cfg, ishape, tshape, 10)


def test_projection_embeds_one_modality_alone():
    image, text, ishape, tshape = _inputs()
    head = build_fusion(FusionConfig(name="projection", dim=32), ishape, tshape, 10)
    both = head(image, text)
    alone = head(image, None)
    assert alone.text is None and torch.equal(alone.image, both.image)
    assert torch.equal(head(None, text).text, both.text)
