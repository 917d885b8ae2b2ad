"""The model card: ``README.md`` beside a saved model's weights, with the Hub's metadata header.

Everything in it is read from the model and, for a trained model, from its run (the resolved config,
``summary.json``'s figures and metrics, and ``recipes/compare.py``'s table when the run was part of a
comparison); nothing is typed by hand. It says above all what was frozen: ``trainable_encoders``, each
tower's tuning and its trainable / frozen parameter counts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
# Names that are not Hub ids: embedded datasets, bundled encoders.
_NOT_ON_THE_HUB = re.compile(r"^(shapes|vlfuse:.*)$")
# Fields of an evaluation record that say where it was taken; with the counts, they are no metrics.
_RECORD_FIELDS = ("step", "epoch", "split", "time_s")
_NOT_METRICS = (*_RECORD_FIELDS, "count", "bad_rows", "train_bad_rows", "skipped_steps")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repository id (``owner/name``), else None (local paths, embedded)."""
    if not name or _NOT_ON_THE_HUB.match(name) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.match(name) else None


def weights_source(encoder: dict[str, Any], library: str) -> str:
    """Where a tower's starting weights came from, from its config section."""
    if not encoder.get("pretrained", True):
        return "random initialization (no pretrained weights)"
    if encoder.get("checkpoint"):
        return f"the local file `{encoder['checkpoint']}`"
    return f"{library} pretrained weights for `{encoder['name']}`"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def metadata(model: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    """The card's YAML header (the Hub reads library, tags, base models, datasets and metrics from it)."""
    meta: dict[str, Any] = {
        "library_name": "vlfuse",
        "tags": [
            "vlfuse",
            "vision-language",
            model["task"],
            f"trainable-encoders-{model['trainable_encoders']}",
            "timm",
            "transformers",
        ],
    }
    bases = [
        _hub_id(model[tower]["name"])
        for tower in ("image_encoder", "text_encoder")
        if model[tower]["pretrained"]
    ]
    if any(bases):
        meta["base_model"] = [b for b in bases if b]
    if run is not None:
        dataset = _hub_id(run["config"]["data"]["dataset"])
        if dataset:
            meta["datasets"] = [dataset]
        names = sorted({k for metrics in run["summary"].get("metrics", {}).values() for k in metrics})
        if names:
            meta["metrics"] = [n for n in names if n not in _NOT_METRICS]
    return meta


def render(model: dict[str, Any], parameters: dict[str, dict[str, int]], run: dict[str, Any] | None) -> str:
    """The card's text.

    Args:
        model: the model config section (as saved in ``vlfuse_config.json``).
        parameters: trainable / frozen counts per part (``VLFuseModel.parameter_counts``).
        run: for a trained model, ``{"config": the resolved config, "summary": summary.json's content}``
            and optionally ``"comparison"`` (``comparison.json``'s content).
    """
    header = yaml.safe_dump(metadata(model, run), sort_keys=False).strip()
    image, text, fusion = model["image_encoder"], model["text_encoder"], model["fusion"]
    lines = [
        "---",
        header,
        "---",
        "",
        f"# vlfuse {model['task']} model",
        "",
        f"A {model['task']} model built with vlfuse: a timm image encoder and a transformers text encoder "
        "feed a fusion head and the task's head.",
        "",
        "## Model",
        "",
        *_table(
            ["part", "name", "starting weights", "settings"],
            [
                [
                    "image encoder",
                    f"`{image['name']}`",
                    weights_source(image, "timm"),
                    f"image_size {image['image_size']}, kwargs {image.get('kwargs') or {}}",
                ],
                [
                    "text encoder",
                    f"`{text['name']}`",
                    weights_source(text, "transformers"),
                    f"max_length {text['max_length']}",
                ],
                [
                    "fusion head",
                    f"`{fusion['name']}`",
                    "trained",
                    f"dim {fusion['dim']}, layers {fusion['num_layers']}",
                ],
                ["task head", f"`{model['task']}`", "trained", ""],
            ],
        ),
        "",
        "## What was frozen",
        "",
        f"`model.trainable_encoders={model['trainable_encoders']}`: "
        + _frozen_sentence(model["trainable_encoders"]),
        "",
        *_table(
            ["part", "learns", "tuning", "trainable parameters", "frozen parameters"],
            [
                [
                    part,
                    "yes" if counts["trainable"] else "no (frozen)",
                    _tuning(model, part, counts),
                    f"{counts['trainable']:,}",
                    f"{counts['frozen']:,}",
                ]
                for part, counts in parameters.items()
            ],
        ),
    ]
    if run is not None:
        lines += _run_sections(run)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from vlfuse import VLFuseModel",
        "",
        'model = VLFuseModel.from_pretrained("<this folder or Hub id>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _frozen_sentence(mode: str) -> str:
    return {
        "none": "both encoders were frozen; only the fusion and task heads learned.",
        "image": "the image encoder learned, the text encoder was frozen.",
        "text": "the text encoder learned, the image encoder was frozen.",
        "all": "both encoders learned with the heads (end-to-end).",
    }[mode]


def _tuning(model: dict[str, Any], part: str, counts: dict[str, int]) -> str:
    if part not in ("image_encoder", "text_encoder") or not counts["trainable"]:
        return "-"
    tuning = model[part].get("tuning", "full")
    if tuning == "lora":
        lora = model[part]["lora"]
        return f"lora (r={lora['r']}, alpha={lora['lora_alpha']}; merged into the saved weights)"
    if tuning == "last_blocks":
        return f"last_blocks ({model[part]['last_blocks']})"
    return tuning


def _run_sections(run: dict[str, Any]) -> list[str]:
    cfg, summary = run["config"], run["summary"]
    data, train = cfg["data"], cfg["train"]
    eval_splits = data["eval_split"] if isinstance(data["eval_split"], list) else [data["eval_split"]]
    lines = [
        "",
        "## Data",
        "",
        *_table(
            ["dataset", "revision", "train split", "evaluation splits", "columns"],
            [
                [
                    f"`{data['dataset']}`",
                    data.get("revision") or "-",
                    f"`{data['train_split']}`",
                    ", ".join(f"`{s}`" for s in eval_splits),
                    ", ".join(f"{k}: `{v}`" for k, v in data["columns"].items()),
                ]
            ],
        ),
        "",
        "## Training",
        "",
        *_table(
            [
                "steps",
                "batch per process",
                "processes",
                "lr",
                "encoder lr",
                "precision",
                "wall time",
                "train samples/s",
            ],
            [
                [
                    summary["steps"],
                    train["batch_size"],
                    summary["num_processes"],
                    train["lr"],
                    train["encoder_lr"],
                    train["mixed_precision"],
                    f"{summary['wall_time_s']:.0f} s",
                    f"{summary['train_samples_per_s']:.1f}",
                ]
            ],
        ),
    ]
    metrics = summary.get("metrics") or {}
    if metrics:
        names = [k for k in next(iter(metrics.values())) if k not in _RECORD_FIELDS]
        lines += [
            "",
            "## Results",
            "",
            *_table(
                ["split", *names],
                [[split, *(_number(m.get(n)) for n in names)] for split, m in metrics.items()],
            ),
        ]
    comparison = run.get("comparison")
    if comparison:
        lines += ["", f"## Comparison (`recipes/compare.py`, split `{comparison['split']}`)", ""]
        lines += _table(
            ["mode", comparison["metric"], "trainable parameters", "wall time (s)", "train samples/s"],
            [
                [
                    r["mode"],
                    _number(r["metrics"].get(comparison["metric"], float("nan"))),
                    f"{r['trainable_parameters']:,}",
                    f"{r['wall_time_s']:.0f}",
                    f"{r['train_samples_per_s']:.1f}",
                ]
                for r in comparison["runs"]
            ],
        )
    return lines


def write_card(folder: Path, model: dict[str, Any], parameters, run: dict[str, Any] | None) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(render(model, parameters, run))
    return path
