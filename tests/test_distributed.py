"""Two real processes (gloo on the CPU), mixed precision and gradient accumulation."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from conftest import TINY_MODEL, tiny_config
from safetensors.torch import load_file, load_model
from test_recipes import SMALL_DATA, launch, read_metrics

from vlfuse.checkpointing import list_checkpoints
from vlfuse.config import load_config
from vlfuse.model import VLFuseModel
from vlfuse.training import train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerate keeps one process-wide state; each in-process run here needs its own settings.
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["none", "image", "text", "all"])
def test_two_processes_keep_ranks_identical_and_frozen_towers_untouched(tmp_path, mode):
    args = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        f"model.trainable_encoders={mode}",
        f"train.output_dir={tmp_path}",
        "train.max_steps=3",
        "train.seed=3",
    ]
    launch("../tests/scripts/grounding_dump_ranks.py", *args, processes=2)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"ranks differ at {k}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # The run's own config (the recipe's defaults under these overrides), as the run wrote it.
    run_model = load_config(str(tmp_path / "config.yaml")).model
    set_seed(3)
    start = VLFuseModel(run_model).state_dict()
    trainable = {"none": (), "image": ("image",), "text": ("text",), "all": ("image", "text")}[mode]
    for tower in ("image", "text"):
        keys = [k for k in start if k.startswith(f"{tower}_encoder.")]
        moved = [k for k in keys if not torch.equal(rank0[k], start[k])]
        if tower in trainable:
            assert moved, f"trainable {tower} tower did not learn"
        else:
            assert moved == [], f"frozen {tower} tower's weights or buffers moved: {moved[:5]}"
    assert any(not torch.equal(rank0[k], start[k]) for k in start if k.startswith("head."))
    # The 2-process (slim) checkpoint holds exactly what trains, unwrapped names, equal to rank 0's weights;
    # with the frozen weights it leaves out it loads into a plain single-process model; final/ is whole.
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")
    plain = VLFuseModel(run_model)
    frozen = {n for names in plain.frozen_state_names().values() for n in names}
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) == set(plain.state_dict()) - frozen
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    missing, unexpected = load_model(plain, str(checkpoint / "model.safetensors"), strict=False)
    assert unexpected == [] and set(missing) <= frozen
    assert not [
        k for k in load_file(str(checkpoint / "model.safetensors")) if k.startswith(("module.", "_orig_mod."))
    ]
    reloaded = VLFuseModel.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(reloaded[k], rank0[k]) for k in rank0)


def _odd_eval_rows(tmp_path) -> int:
    from vlfuse.data.loading import load_split
    from vlfuse.tasks.grounding import GroundingDataset

    cfg = tiny_config(*SMALL_DATA)
    ds = load_split(cfg.data, "validation")
    for n in range(5, len(ds) + 1):
        if len(GroundingDataset(ds.select(range(n)), cfg.data, 64, (0.5,) * 3, (0.5,) * 3)) % 2 == 1:
            return n
    raise AssertionError("no odd-sized prefix")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_metrics_equal_on_one_and_two_processes(tmp_path):
    cfg = tiny_config(
        *SMALL_DATA, "model.fusion.name=dense", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2"
    )
    train(cfg)
    rows = _odd_eval_rows(tmp_path)
    common = [
        *TINY_MODEL,
        *SMALL_DATA,
        f"model.init_from={tmp_path / 'run' / 'final'}",
        f"data.max_eval_samples={rows}",
        "train.eval_batch_size=4",
    ]
    launch("evaluate.py", *common, f"train.output_dir={tmp_path / 'one'}", processes=1)
    launch("evaluate.py", *common, f"train.output_dir={tmp_path / 'two'}", processes=2)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")[0]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["count"] % 2 == 1 and one["count"] == two["count"]
    for key in ("acc@0.5", "acc@0.75", "miou"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key


def test_bf16_on_cpu_trains_with_finite_loss(tmp_path):
    cfg = tiny_config(
        *SMALL_DATA,
        "train.mixed_precision=bf16",
        f"train.output_dir={tmp_path}",
        "train.max_steps=3",
        "train.log_every=1",
        "model.fusion.name=dense",
        "model.trainable_encoders=all",
    )
    metrics = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert torch.isfinite(torch.tensor(summary["last_loss"]))
    assert 0.0 <= metrics["validation"]["miou"] <= 1.0


def test_accumulation_matches_one_big_batch(tmp_path):
    # No BatchNorm or dropout in the trainable path: both towers frozen (the CNN's BN in eval mode, BERT's
    # dropout off), fusion dropout 0.
    base = [
        *SMALL_DATA,
        "model.fusion.name=concat",
        "model.fusion.dropout=0.0",
        "model.trainable_encoders=none",
        "train.max_steps=3",
        "train.max_grad_norm=null",
        "train.lr=1e-3",
        "train.encoder_lr=1e-3",
    ]
    train(tiny_config(*base, "train.batch_size=16", f"train.output_dir={tmp_path / 'big'}"))
    AcceleratorState._reset_state(True)
    train(
        tiny_config(
            *base,
            "train.batch_size=4",
            "train.gradient_accumulation_steps=4",
            f"train.output_dir={tmp_path / 'acc'}",
        )
    )
    big = load_file(str(tmp_path / "big" / "final" / "model.safetensors"))
    acc = load_file(str(tmp_path / "acc" / "final" / "model.safetensors"))
    set_seed(0)  # as train() does before building the model
    start = VLFuseModel(tiny_config(*base).model).state_dict()
    moved = [k for k in big if not torch.equal(big[k], start[k])]
    assert any(k.startswith("fusion.") for k in moved) and any(k.startswith("head.") for k in moved)
    for k in big:
        torch.testing.assert_close(
            acc[k], big[k], rtol=1e-4, atol=1e-5, msg=f"accumulated run differs at {k}"
        )


def test_gradient_checkpointing_only_in_trainable_towers():
    model = VLFuseModel(tiny_config("model.trainable_encoders=text").model)
    model.set_gradient_checkpointing(True)
    assert model.text_encoder.is_grad_checkpointing
    assert not getattr(model.image_encoder.model, "grad_checkpointing", False)
    batch = model.text_encoder.tokenize(["the red circle", "the blue one"])
    model.train()
    out = model(pixel_values=torch.randn(2, 3, 64, 64), **batch)
    out["boxes"].sum().backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters())


def _grounding_rows(folder, sizes, bad_first=False, box_format="xyxy", normalized=False):
    """A local Hub-layout grounding set of non-square images with a white rectangle each; optionally the
    first row's image is undecodable."""
    import io

    import datasets
    from PIL import Image, ImageDraw

    from vlfuse.data.boxes import convert_boxes

    rows = {"image": [], "text": [], "box": []}
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (30, 30, 30))
        x0, y0, x1, y1 = w * 0.2, h * 0.3, w * 0.2 + w * 0.3 + i, h * 0.3 + h * 0.4
        ImageDraw.Draw(image).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(250, 250, 250))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = b"not an image" if bad_first and i == 0 else buffer.getvalue()
        box = convert_boxes(torch.tensor([x0, y0, x1, y1]), "xyxy", box_format)
        if normalized:
            box = box / torch.tensor([w, h, w, h], dtype=torch.float32)
        rows["image"].append({"bytes": data, "path": None})
        rows["text"].append(f"the white box {i}")
        rows["box"].append(box.tolist())
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "text": datasets.Value("string"),
            "box": datasets.Sequence(datasets.Value("float32")),
        }
    )
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "validation-00000-of-00001.parquet")
    )
    return folder


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_bad_row_repeated_as_padding_counts_once(tmp_path):
    """5 examples on 2 processes x batch 2: Accelerate evens the last batches out by repeating the first
    examples, the bad one included; the repeat is dropped from the metrics and from bad_rows."""
    folder = _grounding_rows(
        tmp_path / "ds", [(60, 40), (40, 70), (50, 50), (80, 30), (30, 60)], bad_first=True
    )
    VLFuseModel(tiny_config("model.fusion.name=dense").model).save_pretrained(tmp_path / "model")
    common = [
        *TINY_MODEL,
        f"data.dataset={folder}",
        "data.eval_split=validation",
        f"model.init_from={tmp_path / 'model'}",
        "train.eval_batch_size=2",
    ]
    launch("evaluate.py", *common, f"train.output_dir={tmp_path / 'two'}", processes=2)
    launch("evaluate.py", *common, f"train.output_dir={tmp_path / 'one'}", processes=1)
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")[0]
    assert two["num_processes"] == 2
    assert one["bad_rows"] == two["bad_rows"] == 1 and one["count"] == two["count"] == 4
    assert one["miou"] == pytest.approx(two["miou"], abs=1e-6)


@pytest.mark.parametrize(
    ("box_format", "normalized"), [("xyxy", False), ("xywh", False), ("cxcywh", False), ("xywh", True)]
)
def test_reported_metrics_are_the_metrics_of_predict(tmp_path, box_format, normalized):
    """Acc@0.5 / Acc@0.75 / mean IoU of the loop equal scoring VLFuseModel.predict's pixel boxes on the
    original images against the dataset's boxes (non-square images, every box format)."""
    from PIL import Image

    from vlfuse.data.boxes import paired_iou, to_absolute_xyxy
    from vlfuse.data.loading import load_image, load_split
    from vlfuse.tasks.grounding import grounding_metrics

    sizes = [(90, 40), (40, 90), (64, 64), (120, 50), (33, 77), (70, 35)]
    folder = _grounding_rows(tmp_path / "ds", sizes, box_format=box_format, normalized=normalized)
    cfg = tiny_config(
        "model.fusion.name=dense",
        f"data.dataset={folder}",
        "data.train_split=validation",
        f"data.box_format={box_format}",
        f"data.box_normalized={str(normalized).lower()}",
        "train.batch_size=3",
        "train.max_steps=4",
        f"train.output_dir={tmp_path / 'run'}",
    )
    reported = train(cfg)["validation"]
    model = VLFuseModel.from_pretrained(tmp_path / "run" / "final")
    rows = load_split(cfg.data, "validation")
    images = [load_image(r["image"], None) for r in rows]
    assert all(isinstance(im, Image.Image) for im in images)
    predicted = model.predict(images, list(rows["text"]))
    truth = torch.stack(
        [
            to_absolute_xyxy(r["box"], box_format, normalized, *im.size)
            for r, im in zip(rows, images, strict=True)
        ]
    )
    by_predict = grounding_metrics(paired_iou(predicted, truth))
    assert reported["count"] == by_predict["count"] == len(sizes)
    for key in ("acc@0.5", "acc@0.75", "miou"):
        assert reported[key] == pytest.approx(by_predict[key], abs=1e-5), key
    assert by_predict["miou"] > 0  # real overlaps, not an all-zero agreement


def test_the_private_names_vlfuse_distributed_leans_on_are_there():
    # vlfuse.distributed uses these private names (said beside each use): this fails when Accelerate or
    # torch renames or removes them, before a launch silently changes behaviour.
    from accelerate import PartialState
    from torch.nn.parallel import DistributedDataParallel

    assert isinstance(PartialState._shared_state, dict)
    assert callable(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model)
    model = torch.nn.Linear(2, 2)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["weight"])
    assert model._ddp_params_and_buffers_to_ignore == ["weight"]
