"""A transformers text encoder with its tokenizer: any Hub id or local folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from vlfuse.encoders.base import EncoderOutput
from vlfuse.encoders.text_prefix import TextSplit, split_text_tower
from vlfuse.encoders.tuning import TunableTower, blocks_by_prefix
from vlfuse.schema import TextEncoderConfig

BUNDLED_PREFIX = "vlfuse:"


def resolve_text_encoder_name(name: str) -> str:
    """A Hub id or folder as given; ``vlfuse:<name>`` maps to a folder bundled in the package."""
    if name.startswith(BUNDLED_PREFIX):
        bundled = resources.files("vlfuse") / "assets" / name[len(BUNDLED_PREFIX) :]
        if not bundled.is_dir():
            available = sorted(p.name for p in (resources.files("vlfuse") / "assets").iterdir() if p.is_dir())
            raise ValueError(f"model.text_encoder.name: no bundled encoder {name!r}; bundled: {available}")
        return str(bundled)
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def text_tower_config(config: PretrainedConfig) -> PretrainedConfig:
    """The text tower's config: a dual-tower checkpoint (CLIP, SigLIP, ...) holds it as ``text_config``."""
    text_config = getattr(config, "text_config", None)
    return text_config if isinstance(text_config, PretrainedConfig) else config


def _text_model_class(config: PretrainedConfig, name: str, remote: bool) -> type[PreTrainedModel] | None:
    """The model class of a text tower's config that ``AutoModel`` does not map (SigLIP's
    ``SiglipTextConfig`` -> ``SiglipTextModel``); None when ``AutoModel`` knows it, or when custom code
    the caller allowed (``remote``) names the model class (``auto_map``)."""
    # _model_mapping: transformers' private name for AutoModel's config -> class table (tested in
    # tests/test_encoders.py, which fails if it disappears).
    if type(config) in AutoModel._model_mapping:
        return None
    if remote and "AutoModel" in (getattr(config, "auto_map", None) or {}):
        return None
    cls = getattr(transformers, type(config).__name__.removesuffix("Config") + "Model", None)
    if cls is None:
        raise ValueError(
            f"model.text_encoder.name={name!r}: transformers has no model class for its text tower "
            f"({type(config).__name__})"
        )
    return cls


def override_config(config: PretrainedConfig, overrides: dict) -> PretrainedConfig:
    """``config`` with the attributes in ``overrides`` set (``model.text_encoder.config_overrides``).

    Raises:
        ValueError: an override names an attribute the config does not have (a typo would otherwise be
            stored and silently ignored by the model).
    """
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ValueError(
            f"model.text_encoder.config_overrides: {type(config).__name__} has no attribute(s) {unknown}"
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _load_text_model(
    path: str,
    name: str,
    pretrained: bool,
    remote: bool,
    overrides: dict | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """The text model at ``path``; of a dual-tower checkpoint, its text tower only (with its weights)."""
    config = text_tower_config(AutoConfig.from_pretrained(path, trust_remote_code=remote, revision=revision))
    config = override_config(config, overrides or {})
    cls = _text_model_class(config, name, remote)
    if pretrained:
        if cls is not None:
            return cls.from_pretrained(path, config=config, revision=revision)
        return AutoModel.from_pretrained(path, config=config, trust_remote_code=remote, revision=revision)
    if cls is not None:
        return cls(config)
    return AutoModel.from_config(config, trust_remote_code=remote)


def _drop_unused_modules(model: PreTrainedModel, tokenizer) -> list[str]:
    """Replaces the modules whose parameters never reach ``last_hidden_state`` (BERT's pooler, SigLIP's
    text head) by ``nn.Identity``: a trainable parameter that gets no gradient makes DDP fail.

    Returns:
        The names of the modules replaced.
    """
    ids = tokenizer(["a photo"], return_tensors="pt")
    was_training = model.training
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(True)
    hidden = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    hidden.float().sum().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    model.train(was_training)
    dropped: list[str] = []
    for name, module in model.named_modules():
        params = [f"{name}.{n}" if name else n for n, _ in module.named_parameters()]
        inside_dropped = any(name.startswith(d + ".") for d in dropped)
        if name and params and not inside_dropped and all(p in unused for p in params):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
            dropped.append(name)
    return dropped


class TextEncoder(TunableTower, nn.Module):
    """Wraps a transformers encoder and its tokenizer behind ``EncoderOutput``.

    The pooled vector is the mask-weighted mean of the last hidden states, so every architecture pools
    the same way and no parameter goes unused: modules the fusion never reads (BERT's pooler, SigLIP's
    text head) are removed, since DDP fails on trainable parameters that receive no gradient.
    Encoder-decoder models (T5) contribute their encoder only; a dual-tower checkpoint (CLIP, SigLIP and
    the other families transformers has) its text tower only.

    ``cfg.tuning`` says how the tower learns when it is trainable (``learnable_parameter_names``): every
    weight, LoRA adapters (added here, through peft) or the last transformer layers.

    Args:
        cfg: the text encoder section of the config.
        pretrained: overrides ``cfg.pretrained``.
        source: a folder to load config and tokenizer from instead of ``cfg.name`` (a saved model).
        adapters: with ``tuning: lora``, add the adapters now (a saved model's merged weights have none).
    """

    KEY = "model.text_encoder"

    def __init__(
        self,
        cfg: TextEncoderConfig,
        pretrained: bool | None = None,
        source: str | None = None,
        adapters: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        path = source or resolve_text_encoder_name(cfg.name)
        pretrained = cfg.pretrained if pretrained is None else pretrained
        remote = cfg.trust_remote_code
        revision = (
            None if source else cfg.revision
        )  # a saved model's folder holds the files it was built from
        if remote and not source and revision is None and not Path(path).is_dir():
            print(
                f"warning: model.text_encoder.trust_remote_code=true runs {cfg.name}'s code at the newest "
                "commit; pin model.text_encoder.revision to the commit you reviewed"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote, revision=revision)
            model = _load_text_model(path, cfg.name, pretrained, remote, cfg.config_overrides, revision)
        except OSError as err:
            raise OSError(
                f"model.text_encoder.name={cfg.name!r}: could not load a tokenizer and model from it "
                f"(a Hub id needs network or the local cache; a folder needs config.json and tokenizer "
                f"files): {err}"
            ) from err
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.dropped_modules = _drop_unused_modules(model, self.tokenizer)
        self.model = model
        self.dim = int(
            model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        )
        self.token_dim = self.pooled_dim = self.dim
        if cfg.tuning == "lora" and adapters:
            self.add_adapters()

    # ------------------------------------------------------------------------------------------ tuning
    def _stack(self) -> tuple[str, nn.ModuleList]:
        """The model's layer stack (its longest ``nn.ModuleList``) and its name in the model."""
        lists = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError(
                f"{self.KEY}.tuning=last_blocks: found no layer stack in {type(self.model).__name__}"
            )
        return max(lists, key=lambda nm: len(nm[1]))

    def blocks(self) -> list[list[str]]:
        """Parameter names in blocks: the embeddings, then each layer of the model's layer stack (its
        longest ``nn.ModuleList``); a final norm after the stack goes with the last layer."""
        stack, layers = self._stack()
        return blocks_by_prefix([n for n, _ in self.named_parameters()], f"model.{stack}", len(layers))

    # ----------------------------------------------------------------------------------- frozen prefix
    def cut(self, learnable: set[str]) -> TextSplit | str:
        """The tower cut before its first learnable layer (``vlfuse.encoders.text_prefix``), or why not."""
        stack, _ = self._stack()
        blocks = [[n[len("model.") :] for n in block] for block in self.blocks()]
        return split_text_tower(self.model, stack, blocks, learnable, self.tokenizer)

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output: the hidden states entering the first learnable layer (what the
        feature cache stores)."""
        return self._require_split().prefix(self.model, input_ids, attention_mask)

    def forward_from_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        """``forward`` from the frozen prefix's output: only the learnable layers run. Columns that are
        padding in every row are dropped first (positions are already in the hidden states), so a batch
        read from the cache (padded to ``max_length``) runs as wide as the same texts tokenized live."""
        keep = attention_mask.bool().any(0)
        if not bool(keep.all()):
            hidden, attention_mask = hidden[:, keep], attention_mask[:, keep]
        split = self._require_split()
        return self._output(split.suffix(self.model, hidden, attention_mask.long()), attention_mask)

    @property
    def max_length(self) -> int:
        return self.cfg.max_length

    def tokenize(self, texts: list[str], padding: str | bool = True) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, truncated to ``max_length``."""
        encoded = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._output(hidden, attention_mask)

    @staticmethod
    def _output(hidden: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        mask = attention_mask.bool()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return EncoderOutput(tokens=hidden, pooled=pooled, mask=mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; 4.x has the old.
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enable:
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    @property
    def is_grad_checkpointing(self) -> bool:
        flag = getattr(self.model, "is_activation_checkpointing", None)
        return bool(flag if flag is not None else self.model.is_gradient_checkpointing)

    def save_source(self, folder: str | Path) -> None:
        """Writes the config and tokenizer so the encoder can be rebuilt offline (weights go elsewhere)."""
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
