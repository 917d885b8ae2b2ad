import pytest
import torch
from PIL import Image, ImageDraw

from vlfuse.data.boxes import clip_box, convert_boxes, paired_giou, paired_iou, to_absolute_xyxy
from vlfuse.data.transforms import hflip, letterbox, letterbox_geometry, swap_left_right
from vlfuse.tasks.grounding import boxes_to_pixels, grounding_metrics


def test_format_round_trips():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 2.0]])
    assert torch.allclose(
        convert_boxes(xyxy, "xyxy", "xywh"), torch.tensor([[10.0, 20, 40, 60], [0, 0, 1, 2]])
    )
    assert torch.allclose(
        convert_boxes(xyxy, "xyxy", "cxcywh"), torch.tensor([[30.0, 50, 40, 60], [0.5, 1, 1, 2]])
    )
    for fmt in ("xywh", "cxcywh"):
        assert torch.allclose(convert_boxes(convert_boxes(xyxy, "xyxy", fmt), fmt, "xyxy"), xyxy)
    with pytest.raises(ValueError, match="unknown box format"):
        convert_boxes(xyxy, "xyxy", "yxyx")


def test_dataset_boxes_to_absolute_xyxy():
    assert to_absolute_xyxy([10, 20, 30, 40], "xywh", False, 100, 100).tolist() == [10, 20, 40, 60]
    assert to_absolute_xyxy([0.5, 0.5, 0.2, 0.4], "cxcywh", True, 200, 100).tolist() == pytest.approx(
        [80, 30, 120, 70]
    )
    assert clip_box(torch.tensor([-5.0, 10, 50, 300]), 100, 100).tolist() == [0, 10, 50, 100]
    assert clip_box(torch.tensor([50.0, 10, 20, 30]), 100, 100) is None  # x1 < x0: not a box
    assert clip_box(torch.tensor([10.0, 10, 10, 30]), 100, 100) is None  # zero width
    assert clip_box(torch.tensor([120.0, 10, 150, 30]), 100, 100) is None  # outside the image


def test_iou_giou_and_accuracy_on_hand_made_boxes():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    iou = paired_iou(a, b)
    assert iou.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.5])
    giou = paired_giou(a, b)
    # Disjoint boxes: IoU 0, GIoU = -(hull - union) / hull = -(900 - 200) / 900.
    assert giou[2].item() == pytest.approx(-700 / 900)
    metrics = grounding_metrics(iou)
    assert metrics["acc@0.5"] == pytest.approx(0.5)  # IoU >= 0.5 counts: 1.0 and 0.5
    assert metrics["acc@0.75"] == pytest.approx(0.25)
    assert metrics["miou"] == pytest.approx((1 + 1 / 3 + 0 + 0.5) / 4)


@pytest.mark.parametrize("size_wh", [(200, 80), (60, 150), (97, 97)])
def test_box_follows_image_through_letterbox(size_wh):
    w, h = size_wh
    image = Image.new("RGB", (w, h))
    box = torch.tensor([w * 0.3, h * 0.2, w * 0.7, h * 0.9]).round()
    ImageDraw.Draw(image).rectangle(box.tolist(), fill=(255, 255, 255))
    square, target, meta = letterbox(image, 64, box)
    x0, y0, x1, y1 = (convert_boxes(target, "cxcywh", "xyxy") * 64).tolist()
    pixels = torch.tensor(list(square.convert("L").getdata()), dtype=torch.float32).view(64, 64)
    white = (pixels > 128).nonzero()
    # The white rectangle in the output is where the moved box says (within a pixel of resampling).
    assert white[:, 1].min().item() == pytest.approx(x0, abs=1.5)
    assert white[:, 1].max().item() + 1 == pytest.approx(x1, abs=1.5)
    assert white[:, 0].min().item() == pytest.approx(y0, abs=1.5)
    assert white[:, 0].max().item() + 1 == pytest.approx(y1, abs=1.5)
    # And decoding goes back to the original pixels.
    back = boxes_to_pixels(target.unsqueeze(0), meta.unsqueeze(0))[0]
    assert back.tolist() == pytest.approx(box.tolist(), abs=1e-3)


def test_letterbox_geometry_moves_each_coordinate_as_written_out_one_by_one():
    # The geometry works on whole boxes for speed; it must give exactly what moving each coordinate
    # by its scale and offset, then converting to cxcywh, gives.
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        w, h = (int(v) for v in torch.randint(1, 2000, (2,), generator=gen))
        size = int(torch.randint(16, 400, (1,), generator=gen))
        x0, y0 = float(torch.rand(1, generator=gen)) * w, float(torch.rand(1, generator=gen)) * h
        box = torch.tensor([x0, y0, x0 + float(torch.rand(1, generator=gen)) * (w - x0), h * 0.99])
        (new_w, new_h, px, py), moved, meta = letterbox_geometry(w, h, size, box)
        sx, sy = new_w / w, new_h / h
        one_by_one = (
            torch.stack([box[0] * sx + px, box[1] * sy + py, box[2] * sx + px, box[3] * sy + py]) / size
        )
        assert torch.equal(moved, convert_boxes(one_by_one, "xyxy", "cxcywh")), (w, h, size, box)
        assert meta.tolist() == pytest.approx([sx, sy, px, py, size, w, h])


def test_hflip_moves_box_and_swaps_words():
    image = Image.new("RGB", (100, 50))
    ImageDraw.Draw(image).rectangle([10, 5, 29, 24], fill=(255, 0, 0))
    flipped, box, text = hflip(
        image, torch.tensor([10.0, 5, 30, 25]), "the Left circle, leftmost of the right ones"
    )
    assert box.tolist() == [70, 5, 90, 25]
    assert flipped.getpixel((80, 15)) == (255, 0, 0) and flipped.getpixel((20, 15)) == (0, 0, 0)
    assert text == "the Right circle, rightmost of the left ones"
    assert swap_left_right("bright light") == "bright light"  # whole words only
