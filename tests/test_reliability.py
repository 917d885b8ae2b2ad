"""Each fault injected for real, and what must happen (README: "What happens when things go wrong")."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL, tiny_config
from helpers import train_until_crash_after_checkpoint
from PIL import Image
from safetensors.torch import load_file, load_model
from test_recipes import SMALL_DATA

from vlfuse.checkpointing import CheckpointError, list_checkpoints, resolve_resume
from vlfuse.data.loading import DataError, load_split
from vlfuse.model import VLFuseModel
from vlfuse.tasks.grounding import GroundingDataset, GroundingTask, grounding_loss
from vlfuse.training import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize(
    "learning",
    [
        ["model.trainable_encoders=all"],
        # slim checkpoints: the frozen BatchNorm image tower is rebuilt, not loaded
        ["model.trainable_encoders=text"],
        # slim: LoRA on the CNN (its base weights and BatchNorm layers frozen, the BERT tower whole)
        ["model.trainable_encoders=all", "model.image_encoder.tuning=lora", "model.image_encoder.lora.r=2"],
    ],
    ids=["all", "text", "all-lora"],
)
def test_resume_mid_epoch_is_exact(tmp_path, monkeypatch, learning):
    # Dropout, random flips and trainable towers: every RNG stream matters. 48 images -> 8 steps per
    # epoch, so the resume at step 3 is mid-epoch.
    common = [
        *SMALL_DATA,
        "model.fusion.name=transformer",
        "model.fusion.dropout=0.2",
        *learning,
        "data.hflip_prob=0.5",
        "train.log_every=1",
        "train.eval_every=3",
        "train.checkpoint_every=3",
    ]
    train(tiny_config(*common, "train.max_steps=6", f"train.output_dir={tmp_path / 'straight'}"))
    AcceleratorState._reset_state(True)
    # The second run dies right after its step-3 checkpoint (same schedule: max_steps=6), then resumes.
    resumed_cfg = tiny_config(*common, "train.max_steps=6", f"train.output_dir={tmp_path / 'resumed'}")
    train_until_crash_after_checkpoint(monkeypatch, resumed_cfg, step=3)
    AcceleratorState._reset_state(True)
    train(
        tiny_config(
            *common,
            "train.max_steps=6",
            f"train.output_dir={tmp_path / 'resumed'}",
            "train.resume_from=latest",
        )
    )
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k} differs after resume"
    a, b = (
        _losses(tmp_path / "straight" / "train_log.jsonl"),
        _losses(tmp_path / "resumed" / "train_log.jsonl"),
    )
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # the same loss at every step, bitwise


def test_resuming_an_older_checkpoint_sets_the_abandoned_ones_aside(tmp_path, monkeypatch, capsys):
    common = [*SMALL_DATA, "model.fusion.name=concat", "model.trainable_encoders=text", "train.max_steps=6"]
    out = tmp_path / "run"
    train(tiny_config(*common, f"train.output_dir={tmp_path / 'straight'}"))
    AcceleratorState._reset_state(True)
    # A first run leaves step_2, step_4, step_6.
    train(tiny_config(*common, "train.checkpoint_every=2", "train.keep_last=3", f"train.output_dir={out}"))
    checkpoints = out / "checkpoints"
    abandoned_step_4 = (checkpoints / "step_4" / "trainer_state.json").read_text()
    AcceleratorState._reset_state(True)
    # A second run resumes from step_2 with keep_last=1 and dies right after its own step-4 checkpoint.
    second = tiny_config(
        *common,
        "train.checkpoint_every=2",
        "train.keep_last=1",
        f"train.output_dir={out}",
        f"train.resume_from={checkpoints / 'step_2'}",
    )
    train_until_crash_after_checkpoint(monkeypatch, second, step=4)
    assert "moved 2 checkpoint(s) of an abandoned run (step_4, step_6" in capsys.readouterr().out
    # the checkpoint just written survived keep_last=1; the abandoned run's are aside, not deleted
    assert list_checkpoints(checkpoints) == [checkpoints / "step_4"]
    (aside,) = (checkpoints / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["step_4", "step_6"]
    assert (aside / "step_4" / "trainer_state.json").read_text() == abandoned_step_4
    AcceleratorState._reset_state(True)
    # latest is this run's step_4; the run completes as an uninterrupted one would, bitwise
    train(tiny_config(*common, f"train.output_dir={out}", "train.resume_from=latest"))
    assert f"resumed from {checkpoints / 'step_4'} at step 4" in capsys.readouterr().out
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k} differs after resume"


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    args = [
        *TINY_MODEL,
        *SMALL_DATA,
        "model.fusion.name=dense",
        f"train.output_dir={tmp_path}",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.eval_every=100",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/crash_during_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed, as planned
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".tmp_step_4").is_dir()  # the interrupted save
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_2"]
    assert resolve_resume("latest", tmp_path) == checkpoints / "step_2"
    train(
        tiny_config(
            *SMALL_DATA,
            "model.fusion.name=dense",
            f"train.output_dir={tmp_path}",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "train.resume_from=latest",
        )
    )
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_2", "step_4"]
    assert not (checkpoints / ".tmp_step_4").exists()


def test_corrupted_checkpoint_is_named_and_latest_falls_back(tmp_path, capsys):
    train(
        tiny_config(
            *SMALL_DATA, f"train.output_dir={tmp_path}", "train.max_steps=4", "train.checkpoint_every=2"
        )
    )
    step2, step4 = list_checkpoints(tmp_path / "checkpoints")
    assert not list(step4.glob("custom_checkpoint_*"))  # nothing pickled outside accelerate's safe loaders
    weights = step4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        resolve_resume(str(step4), tmp_path)
    assert resolve_resume("latest", tmp_path, warn=print) == step2
    assert "skipping checkpoint step_4" in capsys.readouterr().out
    optimizer = step2 / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    optimizer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.bin"):
        resolve_resume(str(step2), tmp_path)
    assert resolve_resume("latest", tmp_path, warn=print) is None


def _image_bytes(w=40, h=30, colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format=fmt)
    return buf.getvalue()


def _write_faulty_dataset(folder: Path, n_good: int = 36) -> Path:
    jpeg = _image_bytes(fmt="JPEG")
    bad_images = [b"not an image at all", jpeg[: len(jpeg) // 3], b"", b"plain text, no image"]
    rows = {"image": [], "text": [], "box": []}
    for i in range(n_good):
        rows["image"].append({"bytes": _image_bytes(), "path": None})
        rows["text"].append(["the red box"] if i % 9 else ["the red box", "   "])  # some empty expressions
        rows["box"].append([5.0, 5.0, 25.0, 20.0] if i % 12 else [-10.0, 5.0, 25.0, 50.0])  # partly outside
    for data in bad_images:
        rows["image"].append({"bytes": data, "path": None})
        rows["text"].append(["the red box"])
        rows["box"].append([5.0, 5.0, 25.0, 20.0])
    for box in (
        [20.0, 5.0, 10.0, 20.0],
        [5.0, 5.0, 5.0, 20.0],
        [100.0, 100.0, 120.0, 120.0],
    ):  # x1<x0, w=0, outside
        rows["image"].append({"bytes": _image_bytes(), "path": None})
        rows["text"].append(["the red box"])
        rows["box"].append(box)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Sequence(datasets.Value("string")),
            "box": datasets.Sequence(datasets.Value("float32")),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(folder))
    return folder


def test_bad_rows_are_skipped_counted_and_reported(tmp_path):
    folder = _write_faulty_dataset(tmp_path / "faulty")
    cfg = tiny_config(
        f"data.dataset={folder}",
        "data.max_bad_fraction=0.25",
        f"train.output_dir={tmp_path / 'run'}",
        "train.batch_size=4",
        "train.max_steps=11",
        "train.eval_every=11",
        "train.log_every=1",
    )
    ds = GroundingDataset(load_split(cfg.data, "validation"), cfg.data, 64, (0.5,) * 3, (0.5,) * 3)
    assert ds.counts["empty_expression"] == 4  # rows 0, 9, 18, 27
    examples = [ds[i] for i in range(len(ds))]
    reasons = [e.reason for e in examples if hasattr(e, "reason")]
    assert sorted(reasons) == ["bad_box"] * 3 + ["bad_image"] * 4
    clipped = examples[0].original_box.tolist()  # row 0: [-10, 5, 25, 50] in a 40x30 image
    assert clipped == [0.0, 5.0, 25.0, 30.0]

    metrics = train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_rows"] == 7 and metrics["validation"]["count"] == len(ds) - 7
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_rows"] > 0 and record["train_bad_rows"] == summary["bad_rows"]
    assert all(
        torch.isfinite(v).all()
        for v in load_file(str(tmp_path / "run/final/model.safetensors")).values()
        if v.is_floating_point()
    )


def test_too_many_bad_rows_stop_the_run(tmp_path):
    folder = _write_faulty_dataset(tmp_path / "faulty", n_good=12)
    cfg = tiny_config(
        f"data.dataset={folder}",
        "data.max_bad_fraction=0.05",
        f"train.output_dir={tmp_path / 'run'}",
        "train.batch_size=4",
        "train.max_steps=20",
        "train.log_every=1",
    )
    with pytest.raises(TrainingError, match=r"unusable .* more than data.max_bad_fraction=0.05"):
        train(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.columns={image: image, text: caption, box: box}",
            r"column 'caption' \(data.columns.text\).*\['image'",
        ),
        ("data.eval_split=testA", r"no split 'testA'; splits: \['test', 'train', 'validation'\]"),
    ],
)
def test_missing_column_or_split_stops_before_training(tmp_path, override, message):
    with pytest.raises(DataError, match=message):
        train(tiny_config(*SMALL_DATA, override, f"train.output_dir={tmp_path}"))
    assert not (tmp_path / "train_log.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_truncation_rate_is_reported():
    cfg = tiny_config(*SMALL_DATA)
    model = VLFuseModel(cfg.model)
    ds = GroundingTask().build_dataset(cfg, model, "validation", train=False)
    assert ds.counts["truncated_expression"] == 0
    cfg.model.text_encoder.max_length = 5  # "the small red circle" is 6 tokens with [CLS] and [SEP]
    model.text_encoder.cfg.max_length = 5
    ds = GroundingTask().build_dataset(cfg, model, "validation", train=False)
    assert 0 < ds.counts["truncated_expression"] <= ds.counts["examples"]
    assert "truncated to max_length" in ds.describe()


def test_degenerate_predicted_boxes_give_finite_loss():
    pred = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1e-9, 1.0]], requires_grad=True
    )
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 3)
    loss, _ = grounding_loss({"boxes": pred}, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


class _NaNAt:
    """Wraps GroundingTask.loss: NaN on the given (1-based) calls; checks that a NaN step changed nothing."""

    def __init__(self, calls, holder):
        self.calls, self.holder, self.n, self.snapshots = set(calls), holder, 0, {}

    def __call__(self, task_loss):
        def loss(outputs, batch):
            self.n += 1
            params = torch.cat(
                [p.detach().flatten() for p in self.holder["model"].parameters() if p.requires_grad]
            )
            self.snapshots[self.n] = params.clone()
            value, parts = task_loss(outputs, batch)
            return (value * float("nan") if self.n in self.calls else value), parts

        return loss


def _patch_nan(monkeypatch, calls):
    import vlfuse.training.setup as training

    holder = {}
    build = training.build_model
    monkeypatch.setattr(training, "build_model", lambda cfg: holder.setdefault("model", build(cfg)))
    wrapper = _NaNAt(calls, holder)
    real_get_task = training.get_task

    def get_task(name):
        task = real_get_task(name)
        task.loss = wrapper(task.loss)
        return task

    monkeypatch.setattr(training, "get_task", get_task)
    return wrapper


def test_nan_loss_steps_are_skipped(tmp_path, monkeypatch):
    wrapper = _patch_nan(monkeypatch, calls=[2, 3])
    train(tiny_config(*SMALL_DATA, f"train.output_dir={tmp_path}", "train.max_steps=3", "train.log_every=1"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 2 and wrapper.n == 5
    s = wrapper.snapshots
    assert not torch.equal(s[1], s[2])  # a good step updates
    assert torch.equal(s[2], s[3]) and torch.equal(s[3], s[4])  # the NaN steps 2 and 3 did not
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(lrs) == 3  # the schedule advanced once per real step
    assert torch.isfinite(torch.tensor(summary["last_loss"]))


def test_consecutive_nan_steps_stop_with_a_hint(tmp_path, monkeypatch):
    _patch_nan(monkeypatch, calls=range(2, 100))
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row .* likely causes: a learning rate"):
        train(
            tiny_config(
                *SMALL_DATA, f"train.output_dir={tmp_path}", "train.max_steps=10", "train.max_bad_steps=3"
            )
        )


def test_resume_with_other_batch_size_warns(tmp_path, capsys):
    train(tiny_config(*SMALL_DATA, f"train.output_dir={tmp_path}", "train.max_steps=2"))
    AcceleratorState._reset_state(True)
    train(
        tiny_config(
            *SMALL_DATA,
            f"train.output_dir={tmp_path}",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.resume_from=latest",
        )
    )
    out = capsys.readouterr().out
    assert "warning: the data order changes" in out and "batch 4" in out and "at step 2" in out


@pytest.mark.parametrize("mode", ["all", "none"])
def test_checkpoint_of_any_run_loads_strictly_into_a_plain_model(tmp_path, mode):
    # A whole checkpoint (nothing frozen) loads strictly; a slim one holds exactly the state that trains,
    # and with the frozen weights it leaves out, the model is complete.
    cfg = tiny_config(
        *SMALL_DATA, f"train.output_dir={tmp_path}", "train.max_steps=2", f"model.trainable_encoders={mode}"
    )
    train(cfg)
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")
    model = VLFuseModel(cfg.model)
    missing, unexpected = load_model(model, str(checkpoint / "model.safetensors"), strict=False)
    frozen = {n for names in model.frozen_state_names().values() for n in names}
    # BatchNorm fills a missing num_batches_tracked with its own value instead of reporting it
    frozen = {n for n in frozen if not n.endswith("num_batches_tracked")}
    assert unexpected == []
    assert set(missing) == (frozen if mode == "none" else set())
    keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert not [k for k in keys if k.startswith(("module.", "_orig_mod."))]


def test_loading_code_is_safe():
    sources = {p: p.read_text() for p in (ROOT / "vlfuse").rglob("*.py")}
    for path, text in sources.items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path
        assert "pickle.load" not in text, path
    from vlfuse.schema import TextEncoderConfig

    assert TextEncoderConfig().trust_remote_code is False
