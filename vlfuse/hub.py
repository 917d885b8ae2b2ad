"""Saving, loading and sharing a VLFuseModel: the folder layout, the Hub, LoRA merge and adapter export.

``VLFuseModel.save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` are the public entry points; they
call this module, so the model class holds the network only. This module never imports the model class:
loading receives it (``cls``), saving receives the instance.

A saved folder (``final/`` of a run, or a Hub model repository) holds:

- ``vlfuse_config.json``: the model config section, the image preprocessing settings, the format version;
- ``model.safetensors``: every weight, LoRA adapters merged (no pickle anywhere);
- ``text_encoder/``: the text tower's config and tokenizer (so nothing is downloaded to rebuild it);
- ``adapters/<tower>/``: each LoRA tower's adapter in peft's own format (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(<the tower's base
  model>, path)``;
- ``README.md``: the model card (``vlfuse.card``).

Loading is a trust boundary: what a folder or a repository says can never turn on custom code. The
caller's ``trust_remote_code`` is the only one honoured; the saved value is reported when it differs,
and custom code a folder asks for (an ``auto_map``) is named and not run.

Why not ``huggingface_hub.ModelHubMixin``: its ``__new__`` records the constructor's arguments as a second
``config.json`` (ours are a nested dataclass and a saved folder's path) and its ``from_pretrained`` would
replace the strict, trust-aware loader here. The conventional keyword arguments it gives
(``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``) are taken here the same
way and passed to ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_model, save_file
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from vlfuse.card import write_card
from vlfuse.encoders.image import timm_config
from vlfuse.saved_folder import (
    ADAPTER_WEIGHTS,
    ADAPTERS_DIR,
    CONFIG_NAME,
    FORMAT_VERSION,
    IMAGE_ENCODER_DIR,
    SAVED_FILES,
    TEXT_ENCODER_DIR,
    TEXT_TOWER_FILES,
    TIMM_CONFIG,
    TOWERS,
    WEIGHTS_NAME,
    image_source,
    looks_local,
    read_saved_config,
    report_trust,
)
from vlfuse.schema import to_dict

# peft's adapter files name each weight as PeftModel does: the base model sits at ``base_model.model``.
PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------ load
def resolve_folder(
    path_or_hub_id: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """The local folder of a saved model: ``path_or_hub_id`` itself if it is a folder; otherwise the Hub
    repository of that id, downloaded (or found in the cache) by ``huggingface_hub.snapshot_download``,
    exactly the files ``save_model`` writes (``SAVED_FILES``); the repository and the commit it resolved
    are printed.

    Raises:
        FileNotFoundError: no such folder and no valid Hub id (both readings named), a path that looks
            local (``looks_local``) and does not exist (never read as a Hub id), or the repository could
            not be fetched.
    """
    folder = Path(path_or_hub_id).expanduser()
    if folder.is_dir():
        return folder
    name = str(path_or_hub_id)
    if isinstance(path_or_hub_id, Path) or looks_local(name):
        raise FileNotFoundError(
            f"no saved vlfuse model at {name!r}: {folder.resolve()} does not exist (a path that looks local "
            "is never read as a Hub model id)"
        )
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"no saved vlfuse model at {name!r}: it is not a folder ({folder.resolve()} does not exist), and "
            f"not a Hub model id ({err})"
        ) from None
    try:
        downloaded = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_patterns=SAVED_FILES,
        )
    except Exception as err:  # offline, unknown repository, gated, wrong revision: all say the same here
        raise FileNotFoundError(
            f"no saved vlfuse model at {name!r}: no folder of that name here, and the Hub model repository "
            f"{name} (revision {revision or 'main'}) could not be fetched: {type(err).__name__}: {err}"
        ) from err
    # A snapshot folder is named by the commit it holds.
    log(f"{name}: Hub model repository at commit {Path(downloaded).name} (revision {revision or 'main'})")
    return Path(downloaded)


def load_pretrained(
    cls: type,
    path_or_hub_id: str | Path,
    *,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
    **hub_kwargs: Any,
):
    """Rebuilds a model written by ``save_model`` (``HubMixin.from_pretrained`` documents the arguments;
    ``hub_kwargs`` are ``resolve_folder``'s); the folder's config is read as data
    (``read_saved_config``), weights are loaded strictly, and the model is returned in eval mode."""
    folder = resolve_folder(path_or_hub_id, log=log, **hub_kwargs)
    meta, cfg = read_saved_config(folder)
    report_trust(folder, cfg.text_encoder.trust_remote_code, trust_remote_code, log)
    cfg.text_encoder.trust_remote_code = trust_remote_code
    model = cls(
        cfg,
        pretrained=False,
        image_data_config=meta.get("image_data_config"),
        text_source=str(folder / TEXT_ENCODER_DIR),
        adapters=not meta.get("lora_merged"),
        image_source=image_source(folder, cfg),
    )
    weights = folder / WEIGHTS_NAME
    try:
        load_model(model, str(weights), strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights} is missing") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise RuntimeError(f"could not load weights from {weights}: {err}") from err
    return model.eval()


# ------------------------------------------------------------------------------------------------ save
def save_model(
    model: nn.Module,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Writes ``model`` to ``folder`` (``VLFuseModel.save_pretrained`` documents the arguments)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parameters = run["summary"]["parameters"] if run else model.parameter_counts()
    write_card(folder, to_dict(model.config), parameters, run)
    lora_towers = [tower for tower in TOWERS if getattr(model, tower).has_adapters]
    meta = {
        "model": to_dict(model.config),
        "image_data_config": model.image_encoder.data_config,
        "format_version": FORMAT_VERSION,
        # LoRA adapters are merged into these towers' weights: they load as plain layers.
        "lora_merged": lora_towers,
    }
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    model.text_encoder.save_source(folder / TEXT_ENCODER_DIR)
    unlisted = sorted(p.name for p in (folder / TEXT_ENCODER_DIR).iterdir() if p.name not in TEXT_TOWER_FILES)
    if unlisted:
        print(
            f"warning: {folder / TEXT_ENCODER_DIR}: the tokenizer also wrote {unlisted}, which a Hub "
            f"download of this model does not fetch (it fetches {', '.join(TEXT_TOWER_FILES)})"
        )
    timm_cfg = timm_config(model.config.image_encoder.name)
    if timm_cfg is not None:
        (folder / IMAGE_ENCODER_DIR).mkdir(exist_ok=True)
        (folder / IMAGE_ENCODER_DIR / TIMM_CONFIG).write_text(json.dumps(timm_cfg, indent=2))
    if state_dict is None and not lora_towers:  # safetensors' own writer: shared (tied) tensors once
        save_safetensors_model(model, str(folder / WEIGHTS_NAME))
        return folder
    state = state_dict if state_dict is not None else model.state_dict()
    if lora_towers:
        state = merge_and_export_adapters(model, state, folder, lora_towers)
    # Contiguous CPU copies: a channels_last or sharded tensor is written in the plain layout.
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
    return folder


def merge_and_export_adapters(
    model: nn.Module, state: dict[str, torch.Tensor], folder: Path, lora_towers: list[str]
) -> dict[str, torch.Tensor]:
    """``state`` with each LoRA tower's adapters merged into its weights by peft, and each tower's adapter
    written to ``folder/adapters/<tower>/`` in peft's format.

    The work happens on a CPU copy rebuilt from the config and loaded with ``state`` (the trained model is
    left as it is, and a state gathered from a sharded model is handled the same way): one more copy of
    the model in memory while saving.
    """
    copy = type(model)(
        model.config,
        pretrained=False,
        image_data_config=model.image_encoder.data_config,
        text_source=str(folder / TEXT_ENCODER_DIR),
        adapters=False,
    )
    for tower in lora_towers:
        getattr(copy, tower).add_adapters()
    copy.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True)
    for tower in lora_towers:
        encoder = getattr(copy, tower)
        export_adapter(encoder.model, folder / ADAPTERS_DIR / tower, base_name=encoder.cfg.name)
        merge_adapters(encoder.model)
    return copy.state_dict()


def export_adapter(module: nn.Module, folder: Path, base_name: str | None = None) -> Path:
    """Writes the LoRA adapter injected into ``module`` as ``PeftModel.save_pretrained`` would:
    ``adapter_config.json`` and ``adapter_model.safetensors`` (keys as a PeftModel around ``module``
    names them), so ``PeftModel.from_pretrained(<module without adapters>, folder)`` loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(module, adapter_name="default")
    save_file(
        {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.items()},
        str(folder / ADAPTER_WEIGHTS),
    )
    config = module.peft_config["default"]
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))
    return folder


def merge_adapters(module: nn.Module) -> list[str]:
    """Merges every LoRA layer of ``module`` into its base layer with peft's own ``merge`` (any target type
    peft supports: linear, embedding, convolution, ``Conv1D``'s transposed layout, DoRA) and puts the base
    layer back in its place: what ``PeftModel.merge_and_unload`` does, for adapters injected with
    ``inject_adapter_in_model`` (which leaves no tuner object to call it on).

    Returns:
        The names of the merged modules.
    """
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        if hasattr(layer, "unload_and_optionally_merge_module"):  # peft's MultiheadAttention
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            base = layer.get_base_layer()
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, base)
    if hasattr(module, "peft_config"):
        del module.peft_config
    return [n for n, _ in layers]


# ------------------------------------------------------------------------------------------------- push
def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload vlfuse model",
    revision: str | None = None,
) -> str:
    """Uploads a saved model folder (``final/``) to the Hub model repository ``repo_id`` the way
    transformers' ``push_to_hub`` does: the repository is created if missing (``private`` applies then),
    ``revision`` is a branch (created if missing), the token comes from the usual places. Returns the
    commit's URL."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a saved vlfuse model: {CONFIG_NAME} is missing")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision:
        api.create_branch(repo.repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo.repo_id,
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
    )
    return str(getattr(commit, "commit_url", commit))


def push_model(model: nn.Module, repo_id: str, *, run: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """Saves ``model`` to a temporary folder (card included) and uploads it with ``push_folder``."""
    with tempfile.TemporaryDirectory() as tmp:
        return push_folder(save_model(model, tmp, run=run), repo_id, **kwargs)


class HubMixin:
    """``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` for ``VLFuseModel``: the public entry
    points of this module, mixed into the model class so that the class itself holds the network only
    (the way lerobot takes its Hub I/O from a mixin)."""

    def save_pretrained(
        self,
        folder: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        run: dict[str, Any] | None = None,
    ) -> Path:
        """Writes the config, preprocessing settings, the text tower's config and tokenizer, all weights
        (safetensors; LoRA adapters merged by peft, and each LoRA tower's adapter in peft's format under
        ``adapters/<tower>/``) and the model card (``README.md``) to ``folder``: everything needed to
        rebuild the model with no network, and to know how it was trained.

        Args:
            folder: created if missing.
            state_dict: weights to write instead of this module's own (a full state dict gathered from a
                sharded FSDP/DeepSpeed model by ``accelerator.get_state_dict``).
            run: what the card reports about training (``vlfuse.card.render``): the resolved config and
                the run's summary, and a comparison table; without it the card describes the model only.
        """
        return save_model(self, folder, state_dict=state_dict, run=run)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str = "Upload vlfuse model",
        revision: str | None = None,
        run: dict[str, Any] | None = None,
    ) -> str:
        """Saves the model (``save_pretrained``, card included) and uploads it to the Hub model repository
        ``repo_id``, created if missing (``private`` applies then); ``revision`` is a branch (created if
        missing); the token defaults to ``HF_TOKEN`` or the one ``hf auth login`` stored. Returns the
        commit's URL."""
        return push_model(
            self,
            repo_id,
            run=run,
            token=token,
            private=private,
            commit_message=commit_message,
            revision=revision,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        trust_remote_code: bool = False,
    ):
        """Loads a model written by ``save_pretrained``, in eval mode, weights loaded strictly.

        Args:
            path_or_hub_id: a folder if one exists at that path; otherwise a Hub model repository id
                (``owner/name``, dots allowed), fetched with ``huggingface_hub.snapshot_download``.
            revision: the Hub revision (branch, tag or commit).
            token: a Hub token; default: ``HF_TOKEN`` or the one ``hf auth login`` stored.
            cache_dir: the Hub cache folder; default: huggingface_hub's.
            local_files_only: use the Hub cache only, never the network.
            force_download: download again even if cached.
            trust_remote_code: allow custom code that the text tower's files ask for. Only the caller
                decides: the value saved in the folder is never used (a differing one is reported).
        """
        return load_pretrained(
            cls,
            path_or_hub_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            trust_remote_code=trust_remote_code,
        )
