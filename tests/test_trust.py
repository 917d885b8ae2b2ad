"""Nothing read from someone else's files is code or a secret: saved configs are data (never
interpolated), saved timm keywords are an allowlist, a Hub download fetches exactly the saved files, a
saved folder's format is checked, storage URLs are masked wherever they are written."""

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_config, tiny_model_config
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from test_recipes import SMALL_DATA

import vlfuse.hub as hub
from vlfuse.config import load_config
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.schema.trust import mask_url

IMAGES = [Image.new("RGB", (50, 40), (200, 30, 30))]
TEXTS = ["the red circle"]


@pytest.fixture
def saved(tmp_path):
    model = VLFuseModel(tiny_model_config("model.fusion.name=concat"))
    return model, model.save_pretrained(tmp_path / "saved")


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "vlfuse_config.json").read_text())
    edit(meta)
    (folder / "vlfuse_config.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------- 1. files are data
@pytest.mark.parametrize(
    ("key", "edit"),
    [
        ("model.init_from", lambda m: m["model"].__setitem__("init_from", "${oc.env:HF_TOKEN}")),
        (
            "model.text_encoder.name",
            lambda m: m["model"]["text_encoder"].__setitem__("name", "x-${oc.env:HF_TOKEN}"),
        ),
        ("model.answers[1]", lambda m: m["model"].__setitem__("answers", ["yes", "${model.task}"])),
        (
            "image_data_config.interpolation",
            lambda m: m["image_data_config"].__setitem__("interpolation", "${oc.env:HOME}"),
        ),
    ],
)
def test_an_interpolation_in_a_saved_config_is_refused_naming_the_key(saved, monkeypatch, key, edit):
    monkeypatch.setenv("HF_TOKEN", "hf_the_users_secret")
    _, folder = saved
    _edit_meta(folder, edit)
    with pytest.raises(ConfigError, match=rf"vlfuse_config.json: {re_key(key)} holds an interpolation"):
        VLFuseModel.from_pretrained(folder)


def re_key(key: str) -> str:
    return key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")


def test_a_resolver_in_the_users_config_is_refused_and_key_references_still_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("VLFUSE_TEST_SECRET", "s3cr3t-value")
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  output_dir: runs/${oc.env:VLFUSE_TEST_SECRET}\n")
    with pytest.raises(
        ConfigError, match=r"config key 'train.output_dir' \(from .*run.yaml\) calls a resolver"
    ):
        load_config(config)
    with pytest.raises(
        ConfigError, match=r"config key 'data.dataset' \(from command line\) calls a resolver"
    ):
        load_config(overrides=["data.dataset=${oc.decode:${oc.env:VLFUSE_TEST_SECRET}}"])
    # a reference to another key is the user's own value: it resolves
    config.write_text("train:\n  output_dir: runs/x\n  cache_dir: ${train.output_dir}/cache\n")
    assert load_config(config).train.cache_dir == "runs/x/cache"


def test_no_secret_of_the_users_config_reaches_a_written_file(tmp_path, monkeypatch, capsys):
    """A run whose config holds a storage URL with a password, a user name and secret query parameters
    (a non-study run keeps study.storage): none of them appears in any file the run writes (config.yaml,
    summary.json, metrics, final/ with its card and config), nor in what it prints."""
    from vlfuse.training import train

    secrets = ["pw-Secret-1", "ssl-Secret-2", "tok-Secret-3", "alice-secret-user"]
    url = f"postgresql://{secrets[3]}:{secrets[0]}@db:5432/s?sslpassword={secrets[1]}&token={secrets[2]}&sslmode=require"
    out = tmp_path / "run"
    AcceleratorState._reset_state(True)
    try:
        train(
            tiny_config(*SMALL_DATA, "train.max_steps=1", f"train.output_dir={out}", f"study.storage={url}")
        )
    finally:
        AcceleratorState._reset_state(True)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.yaml", "summary.json", "README.md", "vlfuse_config.json"} <= {p.name for p in written}
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret} written to {path}"
    printed = capsys.readouterr()
    assert not any(s in printed.out + printed.err for s in secrets)
    assert (
        "postgresql://***:***@db:5432/s?sslpassword=***&token=***&sslmode=require"
        in (out / "config.yaml").read_text()
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://me:pw@db-host/studies", "postgresql://***:***@db-host/studies"),
        ("postgresql://me@db-host/studies", "postgresql://***@db-host/studies"),
        (
            "postgresql://db/s?password=pw&application_name=x",
            "postgresql://db/s?password=***&application_name=x",
        ),
        (
            "postgresql+psycopg://u:p@h:5/d?sslpassword=x",
            "postgresql+psycopg://***:***@h:5/d?sslpassword=***",
        ),
        ("sqlite:////runs/study/study.db", "sqlite:////runs/study/study.db"),
    ],
)
def test_storage_urls_are_masked(url, shown):
    assert mask_url(url) == shown


# ------------------------------------------------------------------ 2. saved timm keywords: an allowlist
class _Payload:
    """Unpickling it writes the marker file (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_path": "{pickle}"},
        {"pretrained_cfg_overlay": {"file": "{pickle}"}},
        {"pretrained_cfg": {"file": "{pickle}"}},
        {"cache_dir": "/tmp"},
    ],
)
def test_a_saved_folder_cannot_make_timm_load_a_file(saved, tmp_path, kwargs):
    _, folder = saved
    marker, planted = tmp_path / "marker.txt", folder / "weights.pth"
    planted.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    text = json.dumps(kwargs).replace("{pickle}", str(planted))
    _edit_meta(folder, lambda m: m["model"]["image_encoder"].__setitem__("kwargs", json.loads(text)))
    (name,) = kwargs
    with pytest.raises(
        ConfigError, match=rf"model\.image_encoder\.kwargs\.{name} is not passed to timm from a saved"
    ):
        VLFuseModel.from_pretrained(folder)
    assert not marker.exists()


def test_network_shaping_keywords_of_a_saved_folder_load(tmp_path):
    model = VLFuseModel(
        tiny_model_config("model.fusion.name=concat", "model.image_encoder.kwargs={drop_path_rate: 0.1}")
    )
    loaded = VLFuseModel.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert loaded.config.image_encoder.kwargs == {"drop_path_rate": 0.1}
    torch.testing.assert_close(loaded.predict(IMAGES, TEXTS), model.eval().predict(IMAGES, TEXTS))


def test_the_users_own_config_may_still_pass_any_timm_keyword():
    cfg = tiny_config("model.image_encoder.kwargs={checkpoint_path: weights.pth}")
    assert cfg.model.image_encoder.kwargs == {"checkpoint_path": "weights.pth"}


# ------------------------------------------------------------ 3. a Hub download: exactly the saved files
def _planted_hub(folder: Path, tmp_path: Path, monkeypatch) -> tuple[list, Path]:
    """A mocked ``snapshot_download`` over a repository holding ``folder``'s files and planted ones: it
    fetches what the call's ``allow_patterns`` match (huggingface_hub's own matching) into a snapshot
    folder named by a commit."""
    planted = {
        "text_encoder/modeling_x.py": b"open('/tmp/pwned', 'w')",
        "text_encoder/a/b/big.bin": b"\0" * 1024,
        "text_encoder/tokenizer.pkl": b"pickle",
        "adapters/x/y/z.pkl": b"pickle",
        "adapters/image_encoder/extra.bin": b"pickle",
        "adapters/image_encoder/sub/adapter_config.json": b"{}",
        "image_encoder/modeling.py": b"code",
        "pytorch_model.bin": b"pickle",
        "text_encoder/config.json/evil.py": b"code",
    }
    repo = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    calls: list = []
    commit = "0123456789abcdef0123456789abcdef01234567"

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(allow_patterns)
        snapshot = tmp_path / "hub" / repo_id.replace("/", "--") / "snapshots" / commit
        files = {**repo, **planted}
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(files[name])
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    return calls, tmp_path / "hub" / "someone--model" / "snapshots" / commit


def test_a_hub_download_fetches_exactly_the_saved_files(tmp_path, monkeypatch, capsys):
    model = VLFuseModel(
        tiny_model_config(
            "model.fusion.name=concat",
            "model.trainable_encoders=all",
            "model.image_encoder.tuning=lora",
            "model.text_encoder.tuning=lora",
        )
    )
    folder = model.save_pretrained(tmp_path / "saved")
    saved_names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert saved_names <= set(hub.SAVED_FILES)  # every file the saver writes is fetched
    calls, snapshot = _planted_hub(folder, tmp_path, monkeypatch)
    loaded = VLFuseModel.from_pretrained("someone/model")
    fetched = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert fetched == saved_names  # nothing planted landed
    (patterns,) = calls
    assert all(not any(c in p for c in "*?[") for p in patterns)  # exact names only
    assert "someone/model: Hub model repository at commit 0123456789abcdef" in capsys.readouterr().out
    torch.testing.assert_close(loaded.predict(IMAGES, TEXTS), model.eval().predict(IMAGES, TEXTS))


# ------------------------------------------------------------------------------- 7. format, hf-hub towers
def test_a_folder_of_another_format_says_which(saved):
    _, folder = saved
    _edit_meta(folder, lambda m: m.__setitem__("format_version", 2))
    with pytest.raises(ConfigError, match=r"saved by vlfuse format 2; this vlfuse reads format 1 \(upgrade"):
        VLFuseModel.from_pretrained(folder)
    _edit_meta(folder, lambda m: m.pop("format_version"))
    with pytest.raises(ConfigError, match=r"saved by vlfuse format None; this vlfuse reads format 1"):
        VLFuseModel.from_pretrained(folder)


def test_a_saved_hf_hub_image_tower_loads_without_contacting_anything(tmp_path, monkeypatch):
    """An image tower named ``hf-hub:...`` read its timm config from a Hub-cache layout (the loading path
    a Hub id takes, offline); the saved folder carries that config, so loading it needs no cache."""
    import huggingface_hub
    from huggingface_hub import constants

    commit = "f" * 40
    repo = Path(constants.HF_HUB_CACHE) / "models--someone--tiny-timm"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    timm_cfg = {
        "architecture": "test_resnet",
        "num_classes": 10,
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (snapshot / "config.json").write_text(json.dumps(timm_cfg))
    try:
        model = VLFuseModel(
            tiny_model_config("model.fusion.name=concat", "model.image_encoder.name=hf-hub:someone/tiny-timm")
        )
        folder = model.save_pretrained(tmp_path / "saved")
    finally:
        shutil.rmtree(repo)
    assert json.loads((folder / "image_encoder" / "config.json").read_text()) == timm_cfg

    def no_network(*args, **kwargs):
        raise AssertionError(f"loading contacted the Hub: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", no_network)  # where timm calls it
    loaded = VLFuseModel.from_pretrained(folder)
    assert loaded.config.image_encoder.name == "hf-hub:someone/tiny-timm"
    assert loaded.image_encoder.mean == (0.5, 0.5, 0.5)
    torch.testing.assert_close(loaded.predict(IMAGES, TEXTS), model.eval().predict(IMAGES, TEXTS))


# ------------------------------------------------------------------ 4. the study derives paths, never reads
def test_a_study_record_cannot_make_the_report_delete_or_write_outside_the_output_folder(tmp_path):
    """Records as anyone who can write to a shared storage could plant them: one whose ``run_dir`` points
    at a folder outside ``train.output_dir``, one whose cell climbs out of it, one with a path in a
    metric. The report deletes the non-recommended ``final/`` of this study's own cells only, and writes
    no card outside."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from vlfuse.study.grid import Cell, cell_dir
    from vlfuse.study.records import finished_records
    from vlfuse.study.report import write_report
    from vlfuse.study.stats import summarize

    root, victim = tmp_path / "study", tmp_path / "victim"
    (victim / "final").mkdir(parents=True)
    (victim / "final" / "vlfuse_config.json").write_text("{}")
    (victim / "final" / "README.md").write_text("the victim's card")
    keys = [Cell(mode, 10.0, 0, 0.001).key for mode in ("none", "all")]
    for key in keys:  # each cell's own model, as a first-seed trial leaves it
        (cell_dir(root, Cell.parse(key)) / "final").mkdir(parents=True)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    climbing = "none|10|0|0.001/../../../../victim"
    planted = [
        (keys[0], {"run_dir": str(victim)}),  # the best mode: recommended
        (keys[1], {"run_dir": str(victim), "report_metrics": {"acc": 0.1, "path": str(victim)}}),
        (climbing, {}),
        ("all|10|0|nan", {}),
    ]
    every_cell = CategoricalDistribution([cell for cell, _ in planted])
    for i, (cell, extra) in enumerate(planted):
        record = {"cell": cell, "selection": 0.9 - i / 10, "report": 0.9 - i / 10, "cost": {"trainable": 1}}
        study.add_trial(
            create_trial(
                params={"cell": cell},
                distributions={"cell": every_cell},
                value=0.5,
                user_attrs={"record": {**record, **extra}},
            )
        )
    records = finished_records(optuna.load_study(study_name="s", storage=storage), keys)
    assert sorted(r["cell"] for r in records) == sorted(keys)  # the two bad cells are skipped
    assert all("run_dir" not in r for r in records)
    assert records[1]["report_metrics"] == {"acc": 0.1}  # numbers only
    result = {
        "summary": summarize(records, 0.95, 0.01),
        "confidence": 0.95,
        "metric": "acc",
        "task": "grounding",
    }
    result.update(selection_split="holdout", report_split="validation", cells=keys, trials=2, complete=True)
    write_report(result, records, root, keep_all=False)
    assert (victim / "final" / "README.md").read_text() == "the victim's card"  # untouched
    assert not (cell_dir(root, Cell.parse(keys[1])) / "final").exists()  # its own cell's model: deleted
    assert (cell_dir(root, Cell.parse(keys[0])) / "final").is_dir()  # the recommended one: kept
    shown = json.loads((root / "study.json").read_text())["records"]
    assert all(Path(r["run_dir"]).is_relative_to(root / "trials") for r in shown)


# -------------------------------------------------------------------- 6. a cache folder is verified first
def _path_split(root: Path) -> tuple[Path, Path]:
    """A grounding dataset in Hub layout whose rows name image files (the RefCOCO-on-the-Hub layout)."""
    import datasets
    from PIL import ImageDraw

    images = root / "images"
    images.mkdir()
    for k in range(4):
        image = Image.new("RGB", (48, 40), (40 * k, 60, 90))
        ImageDraw.Draw(image).rectangle([4 + 3 * k, 5, 20 + 3 * k, 30], fill=(220, 30, 30))
        image.save(images / f"{k}.png")
    names = [f"{k % 4}.png" for k in range(12)]
    boxes = [[4.0 + 3 * (k % 4), 5.0, 21.0 + 3 * (k % 4), 31.0] for k in range(12)]
    rows = {"image": names, "text": [f"the red box {k % 3}" for k in range(12)], "box": boxes}
    folder = root / "paths"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / f"{split}-0.parquet"))
    return folder, images


def _tamper_key(folders):
    meta = json.loads((folders["image"] / "cache.json").read_text())
    meta["encoder"]["weights"] = "0" * 64
    (folders["image"] / "cache.json").write_text(json.dumps(meta))


def _plant_valid(folders):
    valid = np.load(folders["image"] / "valid.npy")
    np.save(folders["text"] / "valid.npy", np.zeros_like(valid))  # would mark every row bad


def _negative_index(folders):
    rows = np.load(folders["image"] / "image_row.npy")
    rows[0] = -1
    np.save(folders["image"] / "image_row.npy", rows)


def test_a_tampered_or_stale_cache_folder_is_rebuilt_saying_why_and_metrics_equal_an_uncached_run(
    tmp_path, capsys
):
    import os

    from vlfuse.training import train

    folder, images = _path_split(tmp_path)
    common = [
        f"data.dataset={folder}",
        f"data.image_root={images}",
        "model.fusion.name=concat",
        "model.trainable_encoders=none",
        "train.batch_size=4",
        "train.max_steps=3",
    ]
    cache = [f"train.cache_dir={tmp_path / 'cache'}", "train.cache_features=true"]

    def run(name: str, *extra: str) -> dict:
        AcceleratorState._reset_state(True)
        torch.manual_seed(0)
        try:
            return train(tiny_config(*common, *extra, f"train.output_dir={tmp_path / name}"))["validation"]
        finally:
            AcceleratorState._reset_state(True)

    uncached = run("live")
    assert run("cached", *cache) == pytest.approx(uncached, abs=1e-5)
    capsys.readouterr()
    folders = {t: next((tmp_path / "cache").glob(f"validation-{t}-*")) for t in ("image", "text")}
    for tamper, tower, reason in [
        (_tamper_key, "image", "its key differs in encoder.weights"),
        (_plant_valid, "text", r"its files are not this tower's \(unexpected: \['valid.npy'\]"),
        (_negative_index, "image", r"image_row.npy has indices outside \[0, 4\)"),
    ]:
        tamper(folders)
        metrics = run(tamper.__name__, *cache)
        out = capsys.readouterr().out
        assert re.search(rf"feature cache rebuilt \({tower} tower\): .*validation-{tower}-.*: {reason}", out)
        assert metrics == pytest.approx(uncached, abs=1e-5), tamper.__name__
    # A file behind the same path changes (same name, other pixels): rebuilt; metrics as uncached on it.
    stat = (images / "1.png").stat()
    Image.new("RGB", (48, 40), (250, 250, 0)).save(images / "1.png")
    os.utime(images / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = run("changed", *cache)
    out = capsys.readouterr().out
    assert re.search(r"feature cache rebuilt \(image tower\): .*: its key differs in image_files", out)
    assert changed == pytest.approx(run("changed-live"), abs=1e-5)
    assert changed != pytest.approx(uncached, abs=1e-5)  # the new pixels did change the metrics


# ------------------------------------------------------------- 5. every checkpoint is verified before use
@pytest.fixture
def two_checkpoints(tmp_path):
    from vlfuse.checkpointing import list_checkpoints
    from vlfuse.training import train

    AcceleratorState._reset_state(True)
    try:
        train(
            tiny_config(
                *SMALL_DATA, f"train.output_dir={tmp_path}", "train.max_steps=4", "train.checkpoint_every=2"
            )
        )
    finally:
        AcceleratorState._reset_state(True)
    return list_checkpoints(tmp_path / "checkpoints")


def _relist(folder: Path) -> None:
    """Rewrites a checkpoint's checksum list to cover what is in it now (as someone planting a file
    would); the signature is left as it was."""
    from vlfuse.checkpointing import TRAINER_STATE, _sha256, checkpoint_files

    state = json.loads((folder / TRAINER_STATE).read_text())
    state["files"] = {name: _sha256(folder / name) for name in checkpoint_files(folder)}
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))


def test_a_file_added_to_a_checkpoint_or_a_missing_checksum_list_is_refused(
    two_checkpoints, tmp_path, capsys
):
    from vlfuse.checkpointing import CheckpointError, resolve_resume

    step2, step4 = two_checkpoints
    (step4 / "sub").mkdir()
    (step4 / "sub" / "extra.bin").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match=r"sub/extra.bin is not one of the files the run wrote"):
        resolve_resume(str(step4), tmp_path)
    assert resolve_resume("latest", tmp_path, warn=print) == step2
    assert "skipping checkpoint step_4: " in capsys.readouterr().out
    state = json.loads((step2 / "trainer_state.json").read_text())
    del state["files"]
    (step2 / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"has no checksum list in trainer_state.json .*: not loaded"):
        resolve_resume(str(step2), tmp_path)


def test_a_checkpoint_that_needs_unpickling_loads_only_with_this_users_signature(two_checkpoints, tmp_path):
    """A DCP ``.metadata`` (or a DeepSpeed ``.pt``) is read by unpickling: a checkpoint holding one is
    loaded only if vlfuse signed it under this user's key; a forged checksum list does not help."""
    from vlfuse.checkpointing import SIGNATURE, CheckpointError, _signature, key_file, verify_checkpoint

    _, step4 = two_checkpoints
    assert (step4 / SIGNATURE).is_file() and key_file().is_file()
    shard = step4 / "pytorch_model_fsdp_0"
    shard.mkdir()
    (shard / ".metadata").write_bytes(pickle.dumps({"planted": 1}))
    _relist(step4)  # the attacker lists the planted file with its checksum
    with pytest.raises(CheckpointError, match=r"only unpickling can read \(pytorch_model_fsdp_0/.metadata\)"):
        verify_checkpoint(step4)
    state = (step4 / "trainer_state.json").read_bytes()
    (step4 / SIGNATURE).write_text(_signature(b"someone else's key" * 2, state))
    with pytest.raises(CheckpointError, match=r"was not signed by a run of yours"):
        verify_checkpoint(step4)
    (step4 / SIGNATURE).write_text(_signature(key_file().read_bytes(), state))  # as a run of ours signs it
    assert verify_checkpoint(step4)["step"] == 4


def test_the_text_tower_revision_pins_the_commit_read(bert_folder, capsys):
    """``model.text_encoder.revision`` reaches transformers' loading: in a Hub-cache layout whose main
    branch points at another commit, the pinned commit's config is the one built."""
    from huggingface_hub import constants

    from vlfuse.encoders.text import TextEncoder
    from vlfuse.schema import TextEncoderConfig

    repo = Path(constants.HF_HUB_CACHE) / "models--someone--pinned-bert"
    pinned, newest = "a" * 40, "b" * 40
    try:
        for commit, width in ((pinned, 64), (newest, 48)):
            snapshot = repo / "snapshots" / commit
            shutil.copytree(bert_folder, snapshot)
            config = json.loads((snapshot / "config.json").read_text())
            (snapshot / "config.json").write_text(json.dumps({**config, "intermediate_size": width}))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(newest)
        cfg = TextEncoderConfig(name="someone/pinned-bert", pretrained=False)
        assert TextEncoder(cfg).model.config.intermediate_size == 48  # main
        cfg.revision = pinned
        assert TextEncoder(cfg).model.config.intermediate_size == 64
        cfg.revision, cfg.trust_remote_code = None, True
        TextEncoder(cfg)
        assert "pin model.text_encoder.revision to the commit you reviewed" in capsys.readouterr().out
    finally:
        shutil.rmtree(repo, ignore_errors=True)
