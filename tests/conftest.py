"""Offline, fast settings and tiny-model fixtures shared by every test."""

import os
import tempfile

# Before transformers / datasets / huggingface_hub are imported anywhere.
_HF_HOME = tempfile.mkdtemp(prefix="vlfuse-test-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vlfuse's own cache (features, the checkpoint signing key): a temporary folder, shared by the processes
# the tests launch.
os.environ.setdefault("VLFUSE_CACHE", tempfile.mkdtemp(prefix="vlfuse-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from vlfuse.config import load_config  # noqa: E402
from vlfuse.schema import Config, ModelConfig  # noqa: E402

TINY_MODEL = [
    "model.image_encoder.name=test_resnet",
    "model.image_encoder.pretrained=false",
    "model.image_encoder.image_size=64",
    "model.text_encoder.name=vlfuse:tiny-bert",
    "model.text_encoder.pretrained=false",
    "model.text_encoder.max_length=16",
    "model.fusion.dim=32",
    "model.fusion.num_heads=4",
    "model.fusion.num_layers=2",
]


def tiny_config(*overrides: str) -> Config:
    """A full config with tiny random encoders (timm test_resnet with BatchNorm, a 2-layer BERT)."""
    return load_config(overrides=[*TINY_MODEL, *overrides])


def tiny_model_config(*overrides: str) -> ModelConfig:
    return tiny_config(*overrides).model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    """A BERT model (weights, config, tokenizer) saved to a local folder, as a Hub snapshot would be."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from vlfuse.encoders.text import resolve_text_encoder_name

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = BertTokenizer.from_pretrained(resolve_text_encoder_name("vlfuse:tiny-bert"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL database for the study's storage tests: the server ``.ci/run`` started
    (``VLFUSE_TEST_POSTGRES_URL``), or one started here on loopback with the same script, stopped after."""
    import shutil
    import socket
    import subprocess
    from pathlib import Path

    url = os.environ.get("VLFUSE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    script = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"
    if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        pytest.skip("no PostgreSQL here to start (CI starts one: .ci/run sets VLFUSE_TEST_POSTGRES_URL)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="vlfuse-pg-")
    started = subprocess.run(
        ["bash", str(script), "start", folder, str(port)], capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", folder], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 96x72 photograph with a red patch (the predict and demo tests' image)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "photo.png"
    image = Image.new("RGB", (96, 72), (20, 20, 20))
    image.paste((220, 30, 30), (10, 12, 40, 50))
    image.save(path)
    return path
