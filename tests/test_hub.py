"""Sharing a model: the model card (read from the run), push_to_hub (network stubbed), trackers."""

import json
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState
from conftest import tiny_config
from huggingface_hub import HfApi
from test_recipes import SMALL_DATA

from vlfuse.card import render
from vlfuse.model import VLFuseModel
from vlfuse.training import train


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    AcceleratorState._reset_state(True)
    cfg = tiny_config(
        *SMALL_DATA,
        "model.trainable_encoders=text",
        "train.max_steps=2",
        "train.lr=0.002",
        f"train.output_dir={out}",
    )
    train(cfg)
    AcceleratorState._reset_state(True)
    return out, cfg


def test_the_card_reports_the_run(tiny_run):
    out, cfg = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    meta, body = _card(out / "final")
    assert meta["library_name"] == "vlfuse"
    assert {"vlfuse", "grounding", "trainable-encoders-text"} <= set(meta["tags"])
    assert "datasets" not in meta and "base_model" not in meta  # embedded data, random-init encoders
    assert set(meta["metrics"]) == {"acc@0.5", "acc@0.75", "miou"}
    # the towers, where their weights came from, the fusion and the task
    assert f"`{cfg.model.image_encoder.name}`" in body and f"`{cfg.model.text_encoder.name}`" in body
    assert body.count("random initialization (no pretrained weights)") == 2
    assert f"`{cfg.model.fusion.name}`" in body and "| task head | `grounding` |" in body
    # what was frozen, per part, equal to the run's own counts
    assert "`model.trainable_encoders=text`: the text encoder learned, the image encoder was frozen." in body
    for part, counts in summary["parameters"].items():
        learns = "yes" if counts["trainable"] else "no (frozen)"
        tuning = "full" if part == "text_encoder" else "-"
        assert f"| {part} | {learns} | {tuning} | {counts['trainable']:,} | {counts['frozen']:,} |" in body
    # data and training settings
    assert "| `shapes` | - | `train` | `validation` | image: `image`, text: `text`, box: `box` |" in body
    row = f"| {summary['steps']} | {cfg.train.batch_size} | 1 | 0.002 | {cfg.train.encoder_lr} | no |"
    assert row in body
    assert f"{summary['train_samples_per_s']:.1f}" in body
    # final metrics per split
    metrics = summary["metrics"]["validation"]
    assert (
        f"| validation | {metrics['acc@0.5']:.4f} | {metrics['acc@0.75']:.4f} | {metrics['miou']:.4f} |"
        in body
    )


def test_the_card_names_hub_sources():
    cfg = tiny_config(
        "model.image_encoder.pretrained=true",
        "model.text_encoder.name=google-bert/bert-base-uncased",
        "model.text_encoder.pretrained=true",
    )
    model = {**json.loads(json.dumps(cfg.model, default=lambda o: o.__dict__))}
    run = {"config": {"data": {"dataset": "jxu124/refcoco"}}, "summary": {"metrics": {}}}
    from vlfuse.card import metadata

    meta = metadata(model, run)
    # timm's pretrained config names the image tower's Hub repository
    assert meta["base_model"] == ["timm/test_resnet.r160_in1k", "google-bert/bert-base-uncased"]
    assert meta["datasets"] == ["jxu124/refcoco"]
    assert meta["pipeline_tag"] == "zero-shot-object-detection"
    model["text_encoder"]["name"] = "bert-base-uncased"  # a legacy id without an owner
    model["image_encoder"]["checkpoint"] = "weights.safetensors"  # local weights: no Hub base
    assert metadata(model, run)["base_model"] == ["bert-base-uncased"]
    parts = {p: {"trainable": 1, "frozen": 0} for p in ("image_encoder", "text_encoder", "fusion_and_head")}
    model["image_encoder"]["checkpoint"] = None
    model["text_encoder"]["name"] = "google-bert/bert-base-uncased"
    text = render(model, parts, None)
    assert "timm pretrained weights for `test_resnet`" in text
    assert "transformers pretrained weights for `google-bert/bert-base-uncased`" in text
    assert "## Training" not in text  # no run: the card describes the model only


def test_the_card_metadata_parses_with_eval_results_equal_to_the_last_metrics(tiny_run):
    from huggingface_hub import ModelCard

    out, _ = tiny_run
    data = ModelCard.load(out / "final" / "README.md").data
    assert data.library_name == "vlfuse" and data.pipeline_tag == "zero-shot-object-detection"
    last = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        last[record["split"]] = record
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    expected = {
        (split, name): value
        for split, record in last.items()
        for name, value in record.items()
        if name in ("acc@0.5", "acc@0.75", "miou")
    }
    assert found == expected and len(found) == 3
    assert {r.dataset_name for r in data.eval_results} == {"shapes"}
    assert data.model_name == out.name


class _HubCalls:
    """Records the Hub client's network calls; everything before them runs for real."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.uploaded = {}

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_branch(api, repo_id, **kwargs):
            self.calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(api, **kwargs):
            self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            folder = Path(kwargs["folder_path"])
            # what would be uploaded: a complete model that loads and predicts
            self.uploaded = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            self.model = VLFuseModel.from_pretrained(folder)
            self.card = (folder / "README.md").read_text()
            return type(
                "CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"}
            )()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_to_hub_uploads_a_complete_model(monkeypatch, tiny_run):
    out, _ = tiny_run
    hub = _HubCalls(monkeypatch)
    model = VLFuseModel.from_pretrained(out / "final")
    url = model.push_to_hub("me/tiny", private=True, revision="v1", commit_message="first")
    assert url == "https://huggingface.co/me/tiny/commit/1"
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["branch"] == "v1"
    upload = hub.calls[2][2]
    assert (
        upload["commit_message"] == "first" and upload["revision"] == "v1" and upload["repo_id"] == "me/tiny"
    )
    assert {"README.md", "vlfuse_config.json", "model.safetensors"} <= hub.uploaded
    assert any(n.startswith("text_encoder/") for n in hub.uploaded)
    assert "# vlfuse grounding model" in hub.card


def test_train_push_to_hub_pushes_final(monkeypatch, tmp_path, capsys):
    hub = _HubCalls(monkeypatch)
    out = tmp_path / "my-run"
    train(
        tiny_config(
            *SMALL_DATA,
            "train.max_steps=2",
            "train.push_to_hub=true",
            "train.hub_private=true",
            f"train.output_dir={out}",
        )
    )
    (create, upload) = hub.calls
    assert create[1] == "my-run" and create[2]["private"] is True  # hub_model_id defaults to the folder name
    assert Path(upload[2]["folder_path"]) == out / "final"
    assert (
        "## Results" in hub.card
        and "pushed: https://huggingface.co/my-run/commit/1" in capsys.readouterr().out
    )


def test_trackers_get_the_whole_config_and_the_parameter_counts(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    cfg = tiny_config(
        *SMALL_DATA,
        "model.trainable_encoders=image",
        "train.max_steps=4",
        "train.log_every=2",
        "train.eval_every=4",
        "train.log_with=tensorboard",
        f"train.output_dir={out}",
    )
    train(cfg)
    # the resolved encoder settings are printed at start-up
    assert "image encoder test_resnet (image_size 64, kwargs {})" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    scalars, hparams = {}, {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.step for e in acc.Scalars(tag)]
        hparams.update(_hparams(path))
    assert scalars["train/loss"] == [2, 4] and scalars["train/lr"] == [2, 4]
    assert scalars["validation/acc@0.5"] == [4]
    assert hparams["model.trainable_encoders"] == "image"
    assert hparams["model.image_encoder.name"] == cfg.model.image_encoder.name
    assert hparams["train.lr"] == pytest.approx(cfg.train.lr) and hparams["train.max_steps"] == 4
    assert hparams["data.columns.box"] == "box"
    for part, counts in summary["parameters"].items():
        assert hparams[f"parameters.{part}.trainable"] == counts["trainable"]
        assert hparams[f"parameters.{part}.frozen"] == counts["frozen"]


def _hparams(path: Path) -> dict:
    """The hyperparameters TensorBoard's HParams plugin stored in an event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            if value.tag == "_hparams_/session_start_info":
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                for name, v in data.session_start_info.hparams.items():
                    found[name] = getattr(v, v.WhichOneof("kind"))
    return found
