"""The saved-model folder: the files ``save_pretrained`` writes (``SAVED_FILES``, all a Hub download
fetches) and reading one as data.

A saved folder is someone else's file: its ``vlfuse_config.json`` is read with its format version checked,
never interpolated (``vlfuse.config.section_from_dict``), its timm keyword arguments limited to those that
shape the network (``vlfuse.encoders.image.check_saved_kwargs``), and custom code it asks for is reported,
never run (only the caller's ``trust_remote_code`` decides). ``vlfuse.hub`` loads, saves and pushes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlfuse.config import section_from_dict
from vlfuse.encoders.image import SOURCE_PREFIXES, check_saved_kwargs
from vlfuse.schema import ConfigError, ModelConfig
from vlfuse.schema.trust import refuse_interpolation

CONFIG_NAME = "vlfuse_config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
ADAPTERS_DIR = "adapters"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
IMAGE_ENCODER_DIR = "image_encoder"  # the timm config of a tower named hf-hub:... or local-dir:...
TIMM_CONFIG = "config.json"
TOWERS = ("image_encoder", "text_encoder")
FORMAT_VERSION = 1  # what save_model writes and load_pretrained reads
# The text tower's files, by name: its transformers config and the tokenizer files transformers writes
# (fast tokenizer, vocabularies, merges, SentencePiece models). No code, no pickles, nothing nested.
TEXT_TOWER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
ADAPTER_FILES = ("adapter_config.json", ADAPTER_WEIGHTS)
# Exactly the files save_model can write: a Hub download fetches these names and nothing else. Each is an
# exact name (huggingface_hub matches patterns with fnmatch, whose ``*`` also matches ``/``: a pattern such
# as ``text_encoder/*`` would fetch nested files of any kind).
SAVED_FILES = [
    CONFIG_NAME,
    WEIGHTS_NAME,
    "README.md",
    f"{IMAGE_ENCODER_DIR}/{TIMM_CONFIG}",
    *(f"{TEXT_ENCODER_DIR}/{name}" for name in TEXT_TOWER_FILES),
    *(f"{ADAPTERS_DIR}/{tower}/{name}" for tower in TOWERS for name in ADAPTER_FILES),
]


def looks_local(name: str) -> bool:
    """Whether ``name`` reads as a path rather than a Hub id: it starts with ``.``, ``/``, ``~`` or ``\\``,
    or its first part is a folder here (``outputs/final`` with an ``outputs/`` folder)."""
    if name.startswith((".", "/", "~", "\\")):
        return True
    first = Path(name).parts[0] if Path(name).parts else ""
    return bool(first) and Path(first).is_dir()


def _custom_code(folder: Path) -> list[str]:
    """The custom classes the text tower's files ask for (transformers' ``auto_map``)."""
    asked = []
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
            asked += [str(v) for v in auto_map.values()]
    return sorted(set(asked))


def report_trust(folder: Path, saved: bool, trust_remote_code: bool, log: Callable[[str], None]) -> None:
    if saved != trust_remote_code:
        log(
            f"{folder}: saved with model.text_encoder.trust_remote_code={saved}; using the caller's "
            f"trust_remote_code={trust_remote_code} (a saved model never decides this)"
        )
    code = _custom_code(folder / TEXT_ENCODER_DIR)
    if code and not trust_remote_code:
        log(
            f"{folder / TEXT_ENCODER_DIR}: asks for custom code ({', '.join(code)}); not run: allow it with "
            "from_pretrained's trust_remote_code argument (or model.text_encoder.trust_remote_code=true) "
            "if you trust its author"
        )


def read_saved_config(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    """``vlfuse_config.json`` of a saved folder as data: its format version checked, nothing interpolated
    (``section_from_dict``), the image tower's timm keyword arguments limited to those that shape the
    network (``check_saved_kwargs``), the text tower's config overrides to public attributes.

    Returns:
        The file's content and its model section.

    Raises:
        FileNotFoundError: the file is missing.
        ConfigError: a format this version does not read, or a value refused above, naming the key.
    """
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a saved vlfuse model: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_file}: not a JSON file ({err})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"{config_file}: saved by vlfuse format {version!r}; this vlfuse reads format {FORMAT_VERSION}"
            + (
                " (upgrade vlfuse to load it)"
                if isinstance(version, int) and version > FORMAT_VERSION
                else ""
            )
        )
    if not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{config_file}: has no 'model' section")
    # the model section is checked by section_from_dict, the rest here
    refuse_interpolation({k: v for k, v in meta.items() if k != "model"}, str(config_file))
    cfg = section_from_dict(ModelConfig, meta["model"], str(config_file), prefix="model")
    check_saved_kwargs(cfg.image_encoder.kwargs, str(config_file))
    private = [k for k in cfg.text_encoder.config_overrides if k.startswith("_") or k == "auto_map"]
    if private:
        raise ConfigError(
            f"{config_file}: model.text_encoder.config_overrides.{private[0]} is not taken from a saved "
            "folder (only public attributes of the text config are)"
        )
    return meta, cfg


def image_source(folder: Path, cfg: ModelConfig) -> str | None:
    """``local-dir:`` of the folder's copy of the image tower's timm config (an ``hf-hub:`` or
    ``local-dir:`` tower), its model arguments checked as saved keyword arguments are."""
    if not cfg.image_encoder.name.startswith(SOURCE_PREFIXES):
        return None
    path = folder / IMAGE_ENCODER_DIR / TIMM_CONFIG
    if not path.is_file():
        print(
            f"warning: {folder}: the image tower {cfg.image_encoder.name!r} is built from a timm config "
            f"and the folder has no {IMAGE_ENCODER_DIR}/{TIMM_CONFIG} (saved by an earlier vlfuse): timm "
            "reads it from where the name says; save the model again to make the folder self-contained"
        )
        return None
    timm_cfg = json.loads(path.read_text())
    refuse_interpolation(timm_cfg, str(path))
    check_saved_kwargs(timm_cfg.get("model_args") or {}, str(path), key="model_args")
    return f"local-dir:{path.parent}"
