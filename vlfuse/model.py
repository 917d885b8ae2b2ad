"""VLFuseModel: image encoder + text encoder + fusion head + task head, and the trainable_encoders switch."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from vlfuse.config import TRAINABLE_ENCODERS, ModelConfig, check_task_fusion, section_from_dict, to_dict
from vlfuse.data.transforms import letterbox, to_tensor
from vlfuse.encoders import EncoderOutput, ImageEncoder, TextEncoder
from vlfuse.fusion import TowerShape, build_fusion
from vlfuse.tasks.classification import UNKNOWN, ClassificationHead, predicted_classes
from vlfuse.tasks.grounding import GroundingHead, boxes_to_pixels
from vlfuse.tasks.retrieval import RetrievalHead

CONFIG_NAME = "vlfuse_config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"

# Which towers learn under each value of model.trainable_encoders.
TRAINABLE_TOWERS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "image": frozenset({"image"}),
    "text": frozenset({"text"}),
    "all": frozenset({"image", "text"}),
}
TOWER_ATTRS = {"image": "image_encoder", "text": "text_encoder"}


def _tower_shapes(image: ImageEncoder, text: TextEncoder) -> tuple[TowerShape, TowerShape]:
    return (
        TowerShape(image.token_dim, image.pooled_dim, image.num_tokens, image.grid),
        TowerShape(text.token_dim, text.pooled_dim, text.max_length),
    )


def build_task_head(cfg: ModelConfig, fusion: nn.Module) -> nn.Module:
    """The head of ``cfg.task`` over ``fusion``'s output."""
    check_task_fusion(cfg.task, cfg.fusion.name)
    kind = fusion.output_kind
    if cfg.task == "grounding":
        return GroundingHead(fusion.dim, kind)
    if cfg.task == "retrieval":
        return RetrievalHead(cfg.temperature)
    if cfg.task == "classification":
        return ClassificationHead(fusion.dim, kind, len(cfg.answers) + 1, cfg.fusion.dropout)
    raise ValueError(f"model.task: unknown task {cfg.task!r}")


class VLFuseModel(nn.Module):
    """Two pretrained towers, a fusion head and a task head, with one switch for what learns.

    ``trainable_encoders`` (``none`` | ``image`` | ``text`` | ``all``) is applied by
    ``set_trainable_encoders``: a frozen tower has ``requires_grad=False``, stays in ``eval()`` across
    ``model.train()`` (BatchNorm statistics never move), runs under ``torch.no_grad()`` and is left out of
    ``param_groups``.

    Args:
        cfg: the model section of the config.
        pretrained: overrides both towers' ``pretrained`` (False when rebuilding a saved model).
        image_data_config: saved preprocessing settings of the image tower.
        text_source: a folder with the text tower's config and tokenizer (a saved model).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        pretrained: bool | None = None,
        image_data_config: dict | None = None,
        text_source: str | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.image_encoder = ImageEncoder(
            cfg.image_encoder, pretrained=pretrained, data_config=image_data_config
        )
        self.text_encoder = TextEncoder(cfg.text_encoder, pretrained=pretrained, source=text_source)
        image_shape, text_shape = _tower_shapes(self.image_encoder, self.text_encoder)
        self.fusion = build_fusion(
            cfg.fusion, image_shape, text_shape, max_text_len=cfg.text_encoder.max_length
        )
        self.head = build_task_head(cfg, self.fusion)
        self.set_trainable_encoders(cfg.trainable_encoders)

    # ----------------------------------------------------------------------------------------- the switch
    @property
    def trainable_encoders(self) -> str:
        return self.config.trainable_encoders

    def tower_is_trainable(self, tower: str) -> bool:
        return tower in TRAINABLE_TOWERS[self.config.trainable_encoders]

    def set_trainable_encoders(self, mode: str) -> VLFuseModel:
        """Applies ``mode`` to both towers; idempotent, and reversible in either direction."""
        if mode not in TRAINABLE_TOWERS:
            raise ValueError(
                f"model.trainable_encoders: invalid value {mode!r}; allowed: {', '.join(TRAINABLE_ENCODERS)}"
            )
        self.config.trainable_encoders = mode
        for tower, attr in TOWER_ATTRS.items():
            encoder = getattr(self, attr)
            trainable = tower in TRAINABLE_TOWERS[mode]
            encoder.requires_grad_(trainable)
            encoder.train(self.training and trainable)
        self.fusion.requires_grad_(True)
        self.head.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> VLFuseModel:
        super().train(mode)
        for tower, attr in TOWER_ATTRS.items():
            if not self.tower_is_trainable(tower):
                getattr(self, attr).eval()
        return self

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the trainable towers (frozen ones build no graph to save)."""
        for tower, attr in TOWER_ATTRS.items():
            getattr(self, attr).set_grad_checkpointing(enable and self.tower_is_trainable(tower))

    def frozen_towers(self) -> list[str]:
        return [t for t in TOWER_ATTRS if not self.tower_is_trainable(t)]

    def trainable_parameter_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def _named_trainable(self, encoders: bool) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            in_encoder = name.split(".")[0] in TOWER_ATTRS.values()
            if p.requires_grad and in_encoder == encoders:
                yield name, p

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups holding only trainable parameters: fusion + head at ``lr``, trainable encoders
        at ``encoder_lr``; biases and norm weights (1-d) get no weight decay."""
        groups = []
        for encoders, group_lr, label in ((False, lr, "head"), (True, encoder_lr, "encoders")):
            decay, no_decay = [], []
            for _, p in self._named_trainable(encoders):
                (no_decay if p.ndim <= 1 else decay).append(p)
            for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "_no_decay")):
                if params:
                    groups.append(
                        {"params": params, "lr": group_lr, "weight_decay": wd, "name": label + suffix}
                    )
        return groups

    # ------------------------------------------------------------------------------------------ forward
    def encode_image(self, pixel_values: torch.Tensor) -> EncoderOutput:
        with_pooled = self.fusion.uses_image_pooled
        if self.tower_is_trainable("image"):
            return self.image_encoder(pixel_values, with_pooled=with_pooled)
        with torch.no_grad():
            return self.image_encoder(pixel_values, with_pooled=with_pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        if self.tower_is_trainable("text"):
            return self.text_encoder(input_ids, attention_mask)
        with torch.no_grad():
            return self.text_encoder(input_ids, attention_mask)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        image_pooled: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """Runs the towers, or takes their cached features (``image_tokens``/``image_pooled``,
        ``text_tokens``/``text_mask``/``text_pooled``), then the fusion and the task head.

        Extra keyword arguments (a batch's targets and metadata) are ignored, so ``model(**batch)`` works.
        A retrieval model also takes images alone or texts alone (and returns only those embeddings).
        """
        image = text = None
        if image_tokens is not None:
            image = EncoderOutput(image_tokens, image_pooled, grid=self.image_encoder.grid)
        elif pixel_values is not None:
            image = self.encode_image(pixel_values)
        if text_tokens is not None:
            text = EncoderOutput(text_tokens, text_pooled, mask=text_mask.bool())
        elif input_ids is not None:
            text = self.encode_text(input_ids, attention_mask)
        if (image is None or text is None) and self.config.task != "retrieval":
            raise ValueError(f"task {self.config.task!r} needs both images and texts")
        if image is None and text is None:
            raise ValueError("forward needs pixel_values (or image features) or input_ids (or text features)")
        return self.head(self.fusion(image, text))

    # -------------------------------------------------------------------------------------- preprocessing
    def preprocess_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Letterboxed, normalized pixel values and the per-image meta that maps boxes back."""
        size = self.config.image_encoder.image_size
        interp = self.image_encoder.data_config.get("interpolation", "bilinear")
        pixels, metas = [], []
        for image in images:
            square, _, meta = letterbox(image.convert("RGB"), size, None, interp)
            pixels.append(to_tensor(square, self.image_encoder.mean, self.image_encoder.std))
            metas.append(meta)
        return torch.stack(pixels), torch.stack(metas)

    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image] | None, texts: Sequence[str] | None):
        """The model in eval mode on preprocessed images and/or tokenized texts; restores train mode."""
        was_training = self.training
        self.eval()
        device, inputs, meta = next(self.parameters()).device, {}, None
        if images is not None:
            pixels, meta = self.preprocess_images(images)
            inputs["pixel_values"] = pixels.to(device)
        if texts is not None:
            inputs.update({k: v.to(device) for k, v in self.text_encoder.tokenize(list(texts)).items()})
        try:
            return self(**inputs), meta
        finally:
            self.train(was_training)

    @staticmethod
    def _pairs(
        images: Sequence[Image.Image] | Image.Image, texts: Sequence[str] | str
    ) -> tuple[list[Image.Image], list[str]]:
        images = [images] if isinstance(images, Image.Image) else list(images)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(images) == 1 and len(texts) > 1:
            images = images * len(texts)
        if len(images) != len(texts):
            raise ValueError(
                f"predict got {len(images)} images and {len(texts)} texts; give one text per image"
            )
        return images, texts

    def predict(
        self,
        images: Sequence[Image.Image] | Image.Image | None = None,
        texts: Sequence[str] | str | None = None,
    ) -> Any:
        """Inference on PIL images (any sizes) and texts, by task:

        - grounding: one ``xyxy`` box per (image, expression) pair, in that input image's own pixels
          (``[N, 4]``); one image may be given for all expressions;
        - classification: the answer (a string) per (image, question) pair;
        - retrieval: ``{"image_embeds": [N, D], "text_embeds": [M, D], "similarity": [N, M]}`` (unit
          embeddings; either input may be omitted, and the similarity needs both).
        """
        task = self.config.task
        if task == "retrieval":
            out: dict[str, torch.Tensor] = {}
            if images is not None:
                out["image_embeds"] = self.embed_images(images)
            if texts is not None:
                out["text_embeds"] = self.embed_texts(texts)
            if not out:
                raise ValueError("predict needs images, texts or both")
            if len(out) == 2:
                out["similarity"] = out["image_embeds"] @ out["text_embeds"].T
            return out
        if images is None or texts is None:
            raise ValueError(f"predict for task {task!r} needs images and texts")
        images, texts = self._pairs(images, texts)
        outputs, meta = self._run(images, texts)
        if task == "grounding":
            return boxes_to_pixels(outputs["boxes"], meta).cpu()
        return [self.config.answers[i] for i in predicted_classes(outputs["logits"]).tolist()]

    def _embed(self, key: str, images=None, texts=None) -> torch.Tensor:
        if self.config.task != "retrieval":
            raise ValueError(
                f"embeddings come from a retrieval model; this model's task is {self.config.task!r}"
            )
        return self._run(images, texts)[0][key].cpu()

    def embed_images(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """Retrieval: unit-length image embeddings ``[N, D]``."""
        return self._embed("image_embeds", images=[images] if isinstance(images, Image.Image) else images)

    def embed_texts(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Retrieval: unit-length text embeddings ``[M, D]``."""
        return self._embed("text_embeds", texts=[texts] if isinstance(texts, str) else texts)

    @property
    def answer_vocabulary(self) -> list[str]:
        """Classification: the classes in order (``model.answers`` and the never-predicted unknown)."""
        return [*self.config.answers, UNKNOWN]

    # ------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Writes the config, preprocessing settings, the text tower's config and tokenizer, and all weights
        (safetensors) to ``folder``: everything needed to rebuild the model with no network.

        Args:
            folder: created if missing.
            state_dict: weights to write instead of this module's own (a full state dict gathered from a
                sharded FSDP/DeepSpeed model by ``accelerator.get_state_dict``).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": to_dict(self.config),
            "image_data_config": self.image_encoder.data_config,
            "format_version": 1,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        self.text_encoder.save_source(folder / TEXT_ENCODER_DIR)
        if state_dict is None:
            save_model(self, str(folder / WEIGHTS_NAME))
        else:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(folder / WEIGHTS_NAME)
            )
        return folder

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, revision: str | None = None) -> VLFuseModel:
        """Loads a model written by ``save_pretrained`` from a folder or a Hub model repository."""
        folder = Path(path_or_hub_id).expanduser()
        if not folder.is_dir():
            if str(path_or_hub_id).startswith((".", "/", "~")) or folder.suffix:
                raise FileNotFoundError(f"no saved vlfuse model at {folder}")
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(path_or_hub_id), revision=revision))
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} is not a saved vlfuse model: {CONFIG_NAME} is missing")
        meta = json.loads(config_file.read_text())
        cfg = section_from_dict(ModelConfig, meta["model"])
        model = cls(
            cfg,
            pretrained=False,
            image_data_config=meta.get("image_data_config"),
            text_source=str(folder / TEXT_ENCODER_DIR),
        )
        weights = folder / WEIGHTS_NAME
        try:
            load_model(model, str(weights), strict=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{weights} is missing") from None
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise RuntimeError(f"could not load weights from {weights}: {err}") from err
        return model
