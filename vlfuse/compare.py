"""Frozen vs end-to-end, side by side: one run per mode (a ``trainable_encoders`` value, or ``lora`` /
``last_blocks`` for both towers), then a table and a plot.

Every mode trains the same task, data, fusion head and budget (``train.max_steps`` / ``train.epochs``);
each keeps its own run folder under ``train.output_dir/<mode>``. The comparison is written beside them:
``comparison.json``, ``comparison.md`` and ``comparison.png`` (the eval metric against wall time).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from vlfuse.card import write_card
from vlfuse.distributed import process_state
from vlfuse.hub import CONFIG_NAME
from vlfuse.schema import TUNING, Config, top_only
from vlfuse.tasks import get_task
from vlfuse.training import push_final, train
from vlfuse.training.data import eval_splits


def run_comparison(cfg: Config) -> dict[str, Any]:
    """Trains one run per ``compare.modes`` value and writes the comparison files.

    ``train.cache_features`` applies to the modes with a frozen tower, and to ``last_blocks`` (and LoRA with
    ``lora.last_blocks``) through the towers' prefix cache; it is turned off for ``all``.

    Returns:
        The content of ``comparison.json``.
    """
    root = Path(cfg.train.output_dir)
    split = eval_splits(cfg)[0]
    metric = cfg.compare.metric or get_task(cfg.model.task).primary_metric
    rows = []
    for mode in cfg.compare.modes:
        run_cfg = mode_config(cfg, mode)
        run_cfg.train.output_dir = str(root / mode)
        train(run_cfg)
        summary = json.loads((root / mode / "summary.json").read_text())
        records = [json.loads(line) for line in (root / mode / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r["split"] == split]
        rows.append(
            {
                "mode": mode,
                "metrics": records[-1] if records else {},
                "curve": [{"time_s": r["time_s"], "step": r["step"], metric: r[metric]} for r in records],
                "trainable_parameters": summary["trainable_parameters"],
                "wall_time_s": summary["wall_time_s"],
                "train_samples_per_s": summary["train_samples_per_s"],
                "peak_memory_mb": summary["peak_memory_mb"],
                "peak_memory_kind": summary["peak_memory_kind"],
                "steps": summary["steps"],
                "run_dir": str(root / mode),
            }
        )
    result = {"task": cfg.model.task, "split": split, "metric": metric, "runs": rows}
    if process_state().is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        (root / "comparison.json").write_text(json.dumps(result, indent=2))
        (root / "comparison.md").write_text(comparison_markdown(result))
        plot_comparison(result, root / "comparison.png")
        for row in rows:  # each mode's model card gets the table; then, if asked, each goes to the Hub
            final = Path(row["run_dir"]) / "final"
            add_comparison_to_card(final, result)
            if cfg.train.push_to_hub:
                push_final(cfg, final, suffix=f"-{row['mode']}")
    return result


def add_comparison_to_card(final: Path, comparison: dict[str, Any]) -> None:
    """Rewrites a compared run's model card (``final/README.md``) with the comparison table."""
    rewrite_card(final, comparison=comparison)


def rewrite_card(final: Path, **extra: Any) -> None:
    """Rewrites a run's model card (``final/README.md``) from its saved files, with ``extra`` sections
    (``comparison``, ``study``: see ``vlfuse.card.render``)."""
    run_dir = final.parent
    meta = json.loads((final / CONFIG_NAME).read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    run = {"config": yaml.safe_load((run_dir / "config.yaml").read_text()), "summary": summary, **extra}
    write_card(final, meta["model"], summary["parameters"], run)


def mode_config(cfg: Config, mode: str) -> Config:
    """The config of one comparison run: ``trainable_encoders=mode``, or for ``lora`` / ``last_blocks``
    both towers trainable with that tuning; the feature cache only where a tower is frozen or trains
    only its last blocks (its frozen prefix is cached)."""
    run_cfg = copy.deepcopy(cfg)
    if mode in TUNING:
        run_cfg.model.trainable_encoders = "all"
        run_cfg.model.image_encoder.tuning = run_cfg.model.text_encoder.tuning = mode
    else:
        run_cfg.model.trainable_encoders = mode
    if run_cfg.model.trainable_encoders == "all" and not top_only(run_cfg.model):
        run_cfg.train.cache_features = False
    run_cfg.train.push_to_hub = False  # pushed after the comparison, with the table in each card
    return run_cfg


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    shown = get_task(result["task"]).report_metrics
    metric_names = [k for k in shown if k in result["runs"][0]["metrics"]]
    metric_names = metric_names or [result["metric"]]
    head = [
        "mode",
        *metric_names,
        "trainable params",
        "wall time (s)",
        "train samples/s",
        "peak memory (MiB)",
    ]
    lines = [
        f"# {result['task']}: trainable_encoders compared on split `{result['split']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["runs"]:
        values = [f"{r['metrics'].get(m, float('nan')):.4f}" for m in metric_names]
        lines.append(
            f"| {r['mode']} | "
            + " | ".join(values)
            + f" | {r['trainable_parameters']:,} | {r['wall_time_s']:.1f} | "
            f"{r['train_samples_per_s']:.1f} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict[str, Any], path: Path) -> None:
    """The eval metric against wall time, one line per mode."""
    # matplotlib is imported here, not at the top: it is slow to import and only the plot needs it. A
    # Figure of its own (no pyplot): the caller's backend (a notebook's) is left as it is.
    from matplotlib.figure import Figure

    metric = result["metric"]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for r in result["runs"]:
        curve = r["curve"]
        ax.plot([p["time_s"] for p in curve], [p[metric] for p in curve], marker="o", label=r["mode"])
    label_and_save(
        fig,
        ax,
        path,
        ("wall time (s)", f"{metric} ({result['split']})"),
        f"{result['task']}: trainable_encoders compared",
        "trainable_encoders",
    )


def label_and_save(fig, ax, path: Path, labels: tuple[str, str], title: str, legend: str) -> None:
    """Axis labels (x, y), title, a light grid and the legend of a one-plot figure; then saves it."""
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title=legend)
    fig.tight_layout()
    fig.savefig(path)
