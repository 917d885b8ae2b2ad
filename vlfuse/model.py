"""VLFuseModel: image encoder + text encoder + fusion head + task head, and the trainable_encoders switch.

The model names no task: ``model.task`` is looked up in the registry (``vlfuse.tasks.TASKS``), and the
task builds the head and decodes ``predict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlfuse.encoders import EncoderOutput, ImageEncoder, TextEncoder
from vlfuse.encoders.tuning import freeze_mode
from vlfuse.fusion import TowerShape, build_fusion
from vlfuse.hub import HubMixin
from vlfuse.schema import TRAINABLE_ENCODERS, ModelConfig
from vlfuse.tasks import check_task_fusion, get_task, infer, task_name

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


class VLFuseModel(HubMixin, nn.Module):
    """Two pretrained towers, a fusion head and the head of ``cfg.task``, with one switch for what learns.

    ``trainable_encoders`` (``none`` | ``image`` | ``text`` | ``all``) is applied by
    ``set_trainable_encoders``: a frozen tower has ``requires_grad=False``, stays in ``eval()`` across
    ``model.train()`` (BatchNorm statistics never move), runs under ``torch.no_grad()`` and is left out of
    ``param_groups``.

    Args:
        cfg: the model section of the config.
        pretrained: overrides both towers' ``pretrained`` (False when rebuilding a saved model).
        image_data_config: saved preprocessing settings of the image tower.
        text_source: a folder with the text tower's config and tokenizer (a saved model).
        image_source: a timm name to build the image tower from instead of its configured name (a saved
            model's ``local-dir:`` copy of an ``hf-hub:`` tower's config).
        adapters: add the LoRA adapters of ``lora`` towers (False for a saved model, whose adapters
            are merged into its weights).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        pretrained: bool | None = None,
        image_data_config: dict | None = None,
        text_source: str | None = None,
        adapters: bool = True,
        image_source: str | None = None,
    ) -> None:
        super().__init__()
        cfg.task = task_name(cfg.task)  # a former name (classification, matching) of a saved model
        self.config = cfg
        # The task plug-in (not a module: it holds no weights); it builds the head and decodes predict.
        self.task = get_task(cfg.task)
        check_task_fusion(cfg.task, cfg.fusion.name)
        self.image_encoder = ImageEncoder(
            cfg.image_encoder,
            pretrained=pretrained,
            data_config=image_data_config,
            adapters=adapters,
            source=image_source,
        )
        self.text_encoder = TextEncoder(
            cfg.text_encoder, pretrained=pretrained, source=text_source, adapters=adapters
        )
        image_shape, text_shape = _tower_shapes(self.image_encoder, self.text_encoder)
        self.fusion = build_fusion(
            cfg.fusion, image_shape, text_shape, max_text_len=cfg.text_encoder.max_length
        )
        self.head = self.task.build_head(cfg, self.fusion)
        self.set_trainable_encoders(cfg.trainable_encoders, add_adapters=adapters)

    # ----------------------------------------------------------------------------------------- the switch
    @property
    def trainable_encoders(self) -> str:
        return self.config.trainable_encoders

    def tower_is_trainable(self, tower: str) -> bool:
        return tower in TRAINABLE_TOWERS[self.config.trainable_encoders]

    def set_trainable_encoders(self, mode: str, add_adapters: bool = True) -> VLFuseModel:
        """Applies ``mode`` to both towers; idempotent, and reversible in either direction.

        A trainable tower learns as its ``tuning`` says (every weight, LoRA adapters, or its last blocks);
        the rest of it is frozen like a frozen tower's weights, and modules whose own parameters are all
        frozen stay in eval mode.

        Args:
            add_adapters: add LoRA adapters to a trainable ``lora`` tower that has none (a loaded model's
                merged tower); without them it learns nothing.
        """
        if mode not in TRAINABLE_TOWERS:
            raise ValueError(
                f"model.trainable_encoders: invalid value {mode!r}; allowed: {', '.join(TRAINABLE_ENCODERS)}"
            )
        self.config.trainable_encoders = mode
        for tower, attr in TOWER_ATTRS.items():
            encoder = getattr(self, attr)
            trainable = tower in TRAINABLE_TOWERS[mode]
            if trainable and encoder.cfg.tuning == "lora" and add_adapters and not encoder.has_adapters:
                encoder.add_adapters()
            learnable = encoder.learnable_parameter_names() if trainable else set()
            for name, p in encoder.named_parameters():
                p.requires_grad_(name in learnable)
        self.fusion.requires_grad_(True)
        self.head.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> VLFuseModel:
        super().train(mode)
        for tower, attr in TOWER_ATTRS.items():
            encoder = getattr(self, attr)
            if not self.tower_is_trainable(tower):
                encoder.eval()
            elif mode:
                freeze_mode(encoder)
        return self

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameters per part: each tower, and the fusion + task head."""
        parts = {attr: list(getattr(self, attr).parameters()) for attr in TOWER_ATTRS.values()}
        parts["fusion_and_head"] = [*self.fusion.parameters(), *self.head.parameters()]
        return {
            part: {
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "frozen": sum(p.numel() for p in params if not p.requires_grad),
            }
            for part, params in parts.items()
        }

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the trainable towers (frozen ones build no graph to save)."""
        for tower, attr in TOWER_ATTRS.items():
            getattr(self, attr).set_grad_checkpointing(enable and self.tower_is_trainable(tower))

    def frozen_state_names(self) -> dict[str, list[str]]:
        """The state-dict entries training cannot change, per part (``image_encoder``, ``text_encoder``,
        ...): parameters without gradient, and the buffers of modules held in eval mode during training
        (a frozen tower's, or a frozen layer's in a partly trainable tower: their BatchNorm statistics
        never move). Slim checkpoints leave these out and record their fingerprint instead."""
        was_training = self.training
        self.train(True)
        frozen: dict[str, list[str]] = {}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
            if not module.training:
                own += list(module.named_buffers(recurse=False))
            for name, _ in own:
                full = prefix + name
                frozen.setdefault(full.split(".")[0], []).append(full)
        self.train(was_training)
        state_names = set(self.state_dict())  # non-persistent buffers are not saved at all
        return {part: sorted(n for n in names if n in state_names) for part, names in frozen.items()}

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
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tower_is_trainable("image")):
            return self._on_tower(self.image_encoder, pixel_values, with_pooled=self.fusion.uses_image_pooled)

    def encode_image_prefix(self, prefix: torch.Tensor) -> EncoderOutput:
        """The image tower from its frozen prefix's cached output (``ImageEncoder.forward_from_prefix``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tower_is_trainable("image")):
            return self.image_encoder.forward_from_prefix(prefix, with_pooled=self.fusion.uses_image_pooled)

    def encode_text_prefix(self, prefix: torch.Tensor, mask: torch.Tensor) -> EncoderOutput:
        """The text tower from its frozen layers' cached output (``TextEncoder.forward_from_prefix``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tower_is_trainable("text")):
            return self.text_encoder.forward_from_prefix(prefix, mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tower_is_trainable("text")):
            return self._on_tower(self.text_encoder, input_ids, attention_mask)

    def _on_tower(self, encoder: nn.Module, *inputs: torch.Tensor, **kwargs: Any) -> EncoderOutput:
        """Runs ``encoder`` where its weights are: a frozen tower whose features a run reads from the cache
        stays on the CPU (``place``), and may still be asked to encode raw inputs afterwards."""
        tower_device = next(encoder.parameters()).device
        if tower_device == inputs[0].device:
            return encoder(*inputs, **kwargs)
        return encoder(*(x.to(tower_device) for x in inputs), **kwargs).to(inputs[0].device)

    def place(self, device: torch.device | str, keep_on_cpu: Sequence[str] = ()) -> VLFuseModel:
        """Moves the model to ``device``, except the towers in ``keep_on_cpu`` (``image``/``text``):
        frozen towers whose features all come from the cache would only take accelerator memory."""
        kept = {TOWER_ATTRS[t] for t in keep_on_cpu}
        for name, child in self.named_children():
            child.to("cpu" if name in kept else device)
        return self

    def tower_state_names(self, towers: Sequence[str]) -> list[str]:
        """The parameter and buffer names of ``towers`` (what DDP is told to leave alone when they stay on
        the CPU)."""
        prefixes = tuple(f"{TOWER_ATTRS[t]}." for t in towers)
        names = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        return [n for n in names if n.startswith(prefixes)]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        image_pooled: torch.Tensor | None = None,
        image_prefix: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
        text_prefix: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """Runs the towers, or takes their cached features (``image_tokens``/``image_pooled``,
        ``text_tokens``/``text_mask``/``text_pooled``; ``image_prefix`` and ``text_prefix`` (with
        ``text_mask``), the cached output of the frozen blocks of a tower that trains its last ones), then
        the fusion and the task head.

        ``image_index`` and ``text_index`` (``[P]`` each) pair the inputs by index: the fusion sees image
        ``image_index[p]`` with text ``text_index[p]``, so each image and text is encoded once however many
        pairs it is in (default: image ``i`` with text ``i``).

        Extra keyword arguments (a batch's targets and metadata) are ignored, so ``model(**batch)`` works.
        A fusion that embeds each modality on its own (``projection``) also takes images alone or texts
        alone (and returns only those embeddings).
        """
        image = text = None
        if image_tokens is not None or image_pooled is not None:
            image = EncoderOutput(image_tokens, image_pooled, grid=self.image_encoder.grid)
        elif image_prefix is not None:
            image = self.encode_image_prefix(image_prefix)
        elif pixel_values is not None:
            image = self.encode_image(pixel_values)
        if text_tokens is not None or text_pooled is not None:
            text = EncoderOutput(
                text_tokens, text_pooled, mask=None if text_mask is None else text_mask.bool()
            )
        elif text_prefix is not None:
            text = self.encode_text_prefix(text_prefix, text_mask)
        elif input_ids is not None:
            text = self.encode_text(input_ids, attention_mask)
        if image is None and text is None:
            raise ValueError("forward needs pixel_values (or image features) or input_ids (or text features)")
        if (image is None or text is None) and not self.fusion.single_modality:
            raise ValueError(
                f"task {self.config.task!r} (fusion {self.config.fusion.name!r}) needs both images and texts"
            )
        if image is not None and image_index is not None:
            image = image.select(image_index)
        if text is not None and text_index is not None:
            text = text.select(text_index)
        return self.head(self.fusion(image, text))

    # -------------------------------------------------------------------------------------- inference
    def infer(
        self, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The model in eval mode on raw images and/or texts, and the images' letterbox meta
        (``vlfuse.tasks.base.infer``)."""
        return infer(self, images, texts)

    def predict(
        self,
        images: Sequence[Image.Image] | Image.Image | None = None,
        texts: Sequence[str] | str | None = None,
    ) -> Any:
        """Inference on PIL images (any sizes) and texts, decoded by the model's task: its ``predict``
        says what comes back (grounding's, for one, is an ``xyxy`` box per (image, expression) pair in
        that image's own pixels). One image may serve all texts."""
        return self.task.predict(self, images, texts)

    def embed_images(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """Retrieval: unit-length image embeddings ``[N, D]``."""
        return self.task.embed(self, images=images)

    def embed_texts(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Retrieval: unit-length text embeddings ``[M, D]``."""
        return self.task.embed(self, texts=texts)

    @property
    def answer_vocabulary(self) -> list[str]:
        """Classification: the classes in order (``model.answers`` and the never-predicted unknown)."""
        return self.task.class_names(self.config)
