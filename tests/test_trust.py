"""Nothing read from someone else's files is code or a secret: saved configs are data (never
interpolated), saved timm keywords are an allowlist, a Hub download fetches exactly the saved files, a
saved folder's format is checked, storage URLs are masked wherever they are written."""

import json
import pickle
import shutil
from pathlib import Path

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
