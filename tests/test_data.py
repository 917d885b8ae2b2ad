import datasets
import pytest
import torch
from conftest import tiny_config
from helpers import write_jxu124_layout, write_lmms_layout

from vlfuse.data.boxes import convert_boxes
from vlfuse.data.loading import DataError, available_splits, load_image, load_split
from vlfuse.tasks.grounding import GroundingCollator, GroundingDataset
from vlfuse.training import train

JXU = ["data.columns={image: image_path, text: captions, box: bbox}", "data.box_format=xyxy"]
LMMS = ["data.columns={image: image, text: answer, box: bbox}", "data.box_format=xywh"]


@pytest.fixture(scope="module")
def jxu(tmp_path_factory):
    return write_jxu124_layout(tmp_path_factory.mktemp("jxu"))


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
    return write_lmms_layout(tmp_path_factory.mktemp("lmms"))


def _dataset(cfg, split, train=False):
    ds = load_split(cfg.data, split)
    return GroundingDataset(ds, cfg.data, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=train)


def test_jxu124_layout_paths_lists_and_splits(jxu):
    folder, image_root = jxu
    cfg = tiny_config(f"data.dataset={folder}", f"data.image_root={image_root}", *JXU)
    assert sorted(available_splits(cfg.data)) == ["test", "testB", "train", "validation"]
    raw = load_split(cfg.data, "train")
    ds = _dataset(cfg, "train")
    assert len(ds) == sum(len(c) for c in raw["captions"])  # one example per expression
    example = ds[0]
    image = load_image(raw[0]["image_path"], str(image_root))
    assert example.original_box.tolist() == raw[0]["bbox"]
    assert example.meta[5:].tolist() == [image.width, image.height]
    assert example.pixel_values.shape == (3, 64, 64)


def test_lmms_layout_xywh_and_embedded_images(lmms):
    cfg = tiny_config(f"data.dataset={lmms}", *LMMS)
    assert "train" not in available_splits(cfg.data)
    raw = load_split(cfg.data, "testA")
    ds = _dataset(cfg, "testA")
    assert len(ds) == 2 * len(raw)
    x, y, w, h = raw[0]["bbox"]
    assert ds[0].original_box.tolist() == pytest.approx([x, y, x + w, y + h])


def test_missing_split_lists_splits(lmms):
    cfg = tiny_config(f"data.dataset={lmms}", *LMMS)
    with pytest.raises(DataError, match=r"no split 'train'.*'testA'"):
        load_split(cfg.data, "train")


def test_missing_column_lists_columns(lmms):
    cfg = tiny_config(f"data.dataset={lmms}", "data.columns={image: image, text: sentence, box: bbox}")
    with pytest.raises(DataError, match=r"column 'sentence' \(data.columns.text\).*'answer'"):
        _dataset(cfg, "val")


def test_missing_image_file_names_path_and_key(jxu):
    folder, _ = jxu
    cfg = tiny_config(f"data.dataset={folder}", *JXU)  # no image_root
    with pytest.raises(DataError, match="data.image_root"):
        _dataset(cfg, "train")[0]


def test_save_to_disk_folder_and_normalized_cxcywh(tmp_path):
    from PIL import Image

    rows = {
        "img": [Image.new("RGB", (100, 50)), Image.new("RGB", (40, 80))],
        "expr": ["left one", "right one"],
        "target": [[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 0.5]],
    }
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = tiny_config(
        f"data.dataset={tmp_path / 'saved'}",
        "data.columns={image: img, text: expr, box: target}",
        "data.box_format=cxcywh",
        "data.box_normalized=true",
    )
    ds = _dataset(cfg, "validation")
    assert ds[0].original_box.tolist() == pytest.approx([40, 15, 60, 35])
    assert ds[1].original_box.tolist() == pytest.approx([0, 20, 20, 60])
    # In the letterboxed 64 px input the first image (100x50) is scaled by 0.64 and padded 16 px on top.
    assert convert_boxes(ds[0].box, "cxcywh", "xyxy").mul(64).tolist() == pytest.approx(
        [25.6, 25.6, 38.4, 38.4]
    )


def test_collator_tokenizes_and_stacks(lmms):
    cfg = tiny_config(f"data.dataset={lmms}", *LMMS)
    from vlfuse.model import VLFuseModel

    model = VLFuseModel(cfg.model)
    batch = GroundingCollator(model.text_encoder.tokenize)([_dataset(cfg, "val")[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"].dtype == torch.long
    assert batch["boxes"].shape == (3, 4) and batch["meta"].shape == (3, 7)


@pytest.mark.parametrize("layout", ["jxu", "lmms"])
def test_real_layouts_train_by_config_alone(layout, jxu, lmms, tmp_path):
    if layout == "jxu":
        folder, root = jxu
        over = [
            f"data.dataset={folder}",
            f"data.image_root={root}",
            *JXU,
            "data.eval_split=[validation,testB]",
        ]
    else:
        over = [f"data.dataset={lmms}", *LMMS, "data.train_split=val", "data.eval_split=[testA,testB]"]
    cfg = tiny_config(
        *over,
        "model.fusion.name=transformer",
        f"train.output_dir={tmp_path}",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.eval_every=3",
    )
    metrics = train(cfg)
    assert set(metrics) == set(cfg.data.eval_split)
    for values in metrics.values():
        assert 0.0 <= values["miou"] <= 1.0 and values["count"] > 0
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_a_photos_exif_orientation_is_applied_as_datasets_applies_it(tmp_path):
    """An image read from a file path or encoded bytes (streamed splits, path columns, the feature cache's
    build) is the image datasets' own decoding gives: EXIF orientation applied."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (40, 20), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 20))  # a blue left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    decoded_by_datasets = datasets.Image().decode_example({"path": str(path), "bytes": None})
    for value in (str(path), {"bytes": path.read_bytes(), "path": None}, path.read_bytes()):
        ours = load_image(value, None)
        assert ours.size == (20, 40)
        assert np.array_equal(np.asarray(ours), np.asarray(decoded_by_datasets.convert("RGB")))
    with Image.open(io.BytesIO(path.read_bytes())) as plain:
        assert plain.size == (40, 20)  # the file itself is stored unrotated
