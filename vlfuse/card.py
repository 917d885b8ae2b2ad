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

import timm
from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from vlfuse.schema.mixing import default_name

CARD_NAME = "README.md"
# Names that are not Hub ids: embedded datasets, bundled encoders.
_NOT_ON_THE_HUB = re.compile(r"^(shapes|vlfuse:.*)$")
# Fields of an evaluation record that say where it was taken; with the counts, they are no metrics.
_RECORD_FIELDS = ("step", "epoch", "split", "time_s")
_NOT_METRICS = (*_RECORD_FIELDS, "count", "bad_rows", "train_bad_rows", "skipped_steps")
# The Hub's pipeline tag per task, where one fits (matching has none).
PIPELINE_TAGS = {
    "grounding": "zero-shot-object-detection",
    "retrieval": "zero-shot-image-classification",
    "vqa": "visual-question-answering",
}


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repository id (huggingface_hub's own validator: ``owner/name`` or a
    legacy ``bert-base-uncased``), else None (local paths, embedded datasets, bundled encoders)."""
    if not name or _NOT_ON_THE_HUB.match(name) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def image_base_model(encoder: dict[str, Any]) -> str | None:
    """The Hub repository an image tower's pretrained weights come from: timm's pretrained config knows
    it (``resnet50.a1_in1k`` -> ``timm/resnet50.a1_in1k``); an ``hf-hub:`` name is one. None for random
    or local weights."""
    if not encoder.get("pretrained", True) or encoder.get("checkpoint"):
        return None
    name = encoder["name"]
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            return _hub_id(name[len(prefix) :].split("@")[0])
    if name.startswith("local-dir:"):
        return None
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    return getattr(pretrained_cfg, "hf_hub_id", None) or None


def text_base_model(encoder: dict[str, Any]) -> str | None:
    """A text tower's Hub id when its pretrained weights come from the Hub (not a local folder)."""
    return _hub_id(encoder["name"]) if encoder.get("pretrained", True) else None


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


def card_data(model: dict[str, Any], run: dict[str, Any] | None) -> ModelCardData:
    """The card's metadata, as the Hub reads it (``huggingface_hub.ModelCardData``): library, tags, the
    pipeline tag where one fits, both towers' base models, the dataset and, for a trained model, its
    final metrics per evaluation split as ``model-index`` evaluation results."""
    bases = [image_base_model(model["image_encoder"]), text_base_model(model["text_encoder"])]
    data: dict[str, Any] = {
        "library_name": "vlfuse",
        "tags": [
            "vlfuse",
            "vision-language",
            model["task"],
            f"trainable-encoders-{model['trainable_encoders']}",
            "timm",
            "transformers",
        ],
        "pipeline_tag": PIPELINE_TAGS.get(model["task"]),
        "base_model": [b for b in bases if b] or None,
    }
    if run is not None:
        cfg, metrics = run["config"], run["summary"].get("metrics") or {}
        hub_ids = [_hub_id(source["dataset"]) for source in data_sources(cfg["data"])]
        data["datasets"] = [d for d in hub_ids if d] or None
        names = sorted({k for values in metrics.values() for k in values if k not in _NOT_METRICS})
        data["metrics"] = names or None
        results = eval_results(model["task"], cfg["data"], metrics)
        if results:
            data["eval_results"] = results
            data["model_name"] = cfg["train"].get("hub_model_id") or Path(cfg["train"]["output_dir"]).name
    return ModelCardData(**data)


def data_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The data section of each dataset a run read, with its ``name`` and ``weight``: a mixed run's
    ``data.datasets`` entries over its data section, else the section itself (name None)."""
    if not data.get("datasets"):
        return [{**data, "name": None, "weight": None}]
    return [
        {
            **data,
            **entry,
            "name": entry.get("name") or default_name(entry["dataset"]),
            "weight": entry.get("weight", 1.0),
        }
        for entry in data["datasets"]
    ]


def _where(data: dict[str, Any], key: str) -> tuple[str, str, dict[str, Any]]:
    """(dataset, split, its data section) of a metrics key: ``<split>`` or, in a mixed run,
    ``<split>[<name>]`` (that source's own split at the same position; the overall ``<split>`` is named
    by the sources joined with ``+``)."""
    sources = data_sources(data)
    match = re.fullmatch(r"(.*)\[(.+)\]", key)
    named = {s["name"]: s for s in sources}
    if match is None or match.group(2) not in named:
        if sources[0]["name"] is None:
            return str(data["dataset"]), key, data
        return " + ".join(str(s["dataset"]) for s in sources), key, data
    split, source = match.group(1), named[match.group(2)]
    runs = _splits(data["eval_split"])
    own = _splits(source["eval_split"])
    position = runs.index(split) if split in runs else 0
    return str(source["dataset"]), own[min(position, len(own) - 1)], source


def _splits(value: Any) -> list[str]:
    return list(value) if isinstance(value, list | tuple) else [value]


def eval_results(task: str, data: dict[str, Any], metrics: dict[str, dict[str, Any]]) -> list[EvalResult]:
    """One ``EvalResult`` per (split, metric) of the run's final evaluation (a mixed run's per source
    with that source's dataset and split, and overall)."""
    results = []
    for key, values in metrics.items():
        dataset, split, section = _where(data, key)
        results += [
            EvalResult(
                task_type=PIPELINE_TAGS.get(task, task),
                task_name=task,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_config=section.get("subset"),
                dataset_split=split,
                dataset_revision=section.get("revision"),
                metric_type=name,
                metric_value=value,
            )
            for name, value in values.items()
            if name not in _NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)
        ]
    return results


def metadata(model: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    """The card's YAML header as a dict (``card_data``)."""
    return card_data(model, run).to_dict()


def render(model: dict[str, Any], parameters: dict[str, dict[str, int]], run: dict[str, Any] | None) -> str:
    """The card's text.

    Args:
        model: the model config section (as saved in ``vlfuse_config.json``).
        parameters: trainable / frozen counts per part (``VLFuseModel.parameter_counts``).
        run: for a trained model, ``{"config": the resolved config, "summary": summary.json's content}``
            and optionally ``"comparison"`` (``comparison.json``'s content) or ``"study"`` (``study.json``'s).
    """
    header = card_data(model, run).to_yaml().strip()
    lines = ["---", header, "---", "", f"# vlfuse {model['task']} model", ""]
    lines += [
        f"A {model['task']} model built with vlfuse: a timm image encoder and a transformers text encoder "
        "feed a fusion head and the task's head.",
        *_model_section(model),
        *_frozen_section(model, parameters),
    ]
    if run is not None:
        lines += _run_sections(run)
    lines += ["", "## Use", "", "```python", "from vlfuse import VLFuseModel", ""]
    lines += ['model = VLFuseModel.from_pretrained("<this folder or Hub id>")', "```", ""]
    lines += ['Try it in a browser (a Gradio page on 127.0.0.1:7860; `pip install "vlfuse[demo]"`):', ""]
    lines += ["```bash", "vlfuse demo <this folder or Hub id>", "```", ""]
    return "\n".join(lines)


def _model_section(model: dict[str, Any]) -> list[str]:
    image, text, fusion = model["image_encoder"], model["text_encoder"], model["fusion"]
    rows = [
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
    ]
    return ["", "## Model", "", *_table(["part", "name", "starting weights", "settings"], rows)]


def _frozen_section(model: dict[str, Any], parameters: dict[str, dict[str, int]]) -> list[str]:
    rows = [
        [
            part,
            "yes" if counts["trainable"] else "no (frozen)",
            _tuning(model, part, counts),
            f"{counts['trainable']:,}",
            f"{counts['frozen']:,}",
        ]
        for part, counts in parameters.items()
    ]
    mode = model["trainable_encoders"]
    return [
        "",
        "## What was frozen",
        "",
        f"`model.trainable_encoders={mode}`: " + _frozen_sentence(mode),
        "",
        *_table(["part", "learns", "tuning", "trainable parameters", "frozen parameters"], rows),
    ]


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
    lines = _data_section(cfg["data"]) + _training_section(cfg["train"], summary)
    metrics = summary.get("metrics") or {}
    if metrics:
        names = [k for k in next(iter(metrics.values())) if k not in _RECORD_FIELDS]
        rows = [[split, *(_number(m.get(n)) for n in names)] for split, m in metrics.items()]
        lines += ["", "## Results", "", *_table(["split", *names], rows)]
    if run.get("comparison"):
        lines += _comparison_section(run["comparison"])
    if run.get("study"):
        lines += _study_section(run["study"])
    return lines


def _study_section(study: dict[str, Any]) -> list[str]:
    """The study's table and recommendation (``recipes/study.py``): this run was recommended by it."""
    rows = [
        [
            f"{r['size']:g}" + (f" ({r['train_rows']:,} rows)" if r.get("train_rows") else ""),
            r["mode"],
            f"{r['lr']:.3g}",
            _number(r["mean"]),
            f"[{_number(r['low'])}, {_number(r['high'])}]",
            r["n"],
        ]
        for r in study["summary"]["rows"]
    ]
    head = ["train size", "mode", "lr", f"{study['metric']} mean", f"{study['confidence']:.0%} CI", "seeds"]
    summary = study["summary"]
    recs = [
        f"- size {d['size']:g}: {d['recommended']} (best mean: {d['best']})"
        if d["status"] == "decided"
        else f"- size {d['size']:g}: undecided (best mean: {d['best']}; cheapest shown equivalent so far: "
        f"{d['provisional']})"
        for d in summary["decisions"]
        if d.get("best")
    ]
    return [
        "",
        f"## Study (`recipes/study.py`, split `{study['report_split']}`; rates and modes chosen on "
        f"`{study['selection_split']}`)",
        "",
        *_table(head, rows),
        "",
        f"Recommended: the cheapest mode practically equivalent to the best (within ±{summary['rope']:g}) "
        f"with probability >= {summary['probability']:g} on `{study['selection_split']}`:",
        "",
        *recs,
    ]


def _data_section(data: dict[str, Any]) -> list[str]:
    sources = data_sources(data)
    mixed = sources[0]["name"] is not None
    rows = []
    for source in sources:
        row = [
            f"`{source['dataset']}`",
            source.get("revision") or "-",
            f"`{source['train_split']}`",
            ", ".join(f"`{s}`" for s in _splits(source["eval_split"])),
            ", ".join(f"{k}: `{v}`" for k, v in source["columns"].items()),
        ]
        rows.append([source["name"], source["weight"], *row] if mixed else row)
    head = ["dataset", "revision", "train split", "evaluation splits", "columns"]
    lines = ["", "## Data", ""]
    if mixed:
        head = ["source", "weight", *head]
        lines += [f"Several datasets mixed by weight (`data.mix_stopping={data.get('mix_stopping')}`).", ""]
    return [*lines, *_table(head, rows)]


def _training_section(train: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    head = ["steps", "batch per process", "processes", "lr", "encoder lr", "precision", "wall time"]
    row = [
        summary["steps"],
        train["batch_size"],
        summary["num_processes"],
        train["lr"],
        train["encoder_lr"],
        train["mixed_precision"],
        f"{summary['wall_time_s']:.0f} s",
        f"{summary['train_samples_per_s']:.1f}",
    ]
    return ["", "## Training", "", *_table([*head, "train samples/s"], [row])]


def _comparison_section(comparison: dict[str, Any]) -> list[str]:
    metric = comparison["metric"]
    rows = [
        [
            r["mode"],
            _number(r["metrics"].get(metric, float("nan"))),
            f"{r['trainable_parameters']:,}",
            f"{r['wall_time_s']:.0f}",
            f"{r['train_samples_per_s']:.1f}",
        ]
        for r in comparison["runs"]
    ]
    head = ["mode", metric, "trainable parameters", "wall time (s)", "train samples/s"]
    return [
        "",
        f"## Comparison (`recipes/compare.py`, split `{comparison['split']}`)",
        "",
        *_table(head, rows),
    ]


def write_card(folder: Path, model: dict[str, Any], parameters, run: dict[str, Any] | None) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(render(model, parameters, run))
    return path
