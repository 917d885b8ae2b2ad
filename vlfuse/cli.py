"""The ``vlfuse`` command (``pip install vlfuse``; also ``python -m vlfuse``): the recipes as subcommands,
with the configs that ship inside the package.

    vlfuse train grounding [--config FILE|NAME] [key=value ...]   # grounding, retrieval, vqa, itm
    vlfuse evaluate [--config FILE|NAME] model.init_from=runs/grounding/final
    vlfuse predict MODEL --image photo.jpg --text "the red circle"
    vlfuse demo MODEL                                             # a Gradio page on 127.0.0.1:7860
    vlfuse compare [--config FILE|NAME] [key=value ...]
    vlfuse study [--config FILE|NAME] [key=value ...]
    vlfuse configs                                                # the shipped configs, by name
    accelerate launch -m vlfuse train grounding ...                 # several processes or GPUs

``recipes/*.py`` call the same functions (``accelerate launch recipes/grounding.py`` is the same run as
``accelerate launch -m vlfuse train grounding``); ``recipes/configs`` is a link to the package's configs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlfuse.compare import run_comparison
from vlfuse.config import SHIPPED_CONFIGS, load_cli_config, shipped_configs
from vlfuse.demo import main as demo_main
from vlfuse.distributed import process_state
from vlfuse.predict import main as predict_main
from vlfuse.study import StudyError, run_study
from vlfuse.training import USER_ERRORS, evaluate_saved, format_metrics, train

TASKS = ("grounding", "retrieval", "vqa", "itm")


def _task_lines(task: str, metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Each split's headline next to its chance level or baseline."""
    lines = []
    for split, m in metrics.items():
        if task == "retrieval":
            chance = m["chance_r1"]
            lines.append(
                f"{split}: text->image R@1 {m['t2i_r@1']:.4f}, image->text R@1 {m['i2t_r@1']:.4f}; chance "
                f"{chance:.4f} (1/{m['images']} images): {m['t2i_r@1'] / chance:.1f}x and "
                f"{m['i2t_r@1'] / chance:.1f}x chance"
            )
        elif task == "vqa":
            baseline = m["majority_baseline"]
            ratio = m["accuracy"] / baseline if baseline > 0 else float("inf")
            lines.append(
                f"{split}: accuracy {m['accuracy']:.4f}; majority-answer baseline {baseline:.4f} "
                f"(always the most frequent train answer): {ratio:.2f}x"
            )
        elif task == "itm":
            lines.append(
                f"{split}: accuracy {m['accuracy']:.4f}, ROC-AUC {m['roc_auc']:.4f} over {m['pairs']:,} "
                "pairs (half matching, half not); chance 0.5 for both"
            )
    return lines


def train_task(
    task: str, argv: Sequence[str], on_end: Callable | None = None, prog: str | None = None
) -> None:
    """Trains ``task`` (default config: the embedded dataset's, ``<task>/shapes``) and prints its
    metrics, once (not once per process)."""
    cfg = load_cli_config(argv, SHIPPED_CONFIGS / task / "shapes.yaml", task=task, prog=prog)
    metrics = train(cfg, on_end=on_end)
    state = process_state()
    state.print(format_metrics(metrics))
    for line in _task_lines(task, metrics):
        state.print(line)


def evaluate(argv: Sequence[str], prog: str | None = None) -> None:
    """Scores a trained model (``model.init_from``) on one or several splits, without training."""
    cfg = load_cli_config(argv, SHIPPED_CONFIGS / "grounding" / "shapes.yaml", prog=prog)
    results = evaluate_saved(cfg)  # before the process state: the run's Accelerator makes it
    process_state().print(format_metrics(results))


# The embedded default's budget for compare, split over its runs.
COMPARE_OVERRIDES = ["train.output_dir=runs/compare", "train.max_steps=400", "train.eval_every=100"]


def compare(argv: Sequence[str], prog: str | None = None) -> None:
    """Frozen vs end-to-end side by side (``recipes/compare.py``)."""
    cfg = load_cli_config(argv, SHIPPED_CONFIGS / "grounding" / "shapes.yaml", COMPARE_OVERRIDES, prog=prog)
    run_comparison(cfg)
    print((Path(cfg.train.output_dir) / "comparison.md").read_text())
    print(f"plot: {Path(cfg.train.output_dir) / 'comparison.png'}")


def study(argv: Sequence[str], prog: str | None = None) -> None:
    """Which mode (and towers) for this data (``recipes/study.py``)."""
    cfg = load_cli_config(argv, SHIPPED_CONFIGS / "grounding" / "shapes_study.yaml", prog=prog)
    run_study(cfg)
    out = Path(cfg.train.output_dir)
    if (out / "study.md").is_file():
        print((out / "study.md").read_text())
        print(f"plots: {out / 'study_curves.png'}, {out / 'study_cost.png'}, {out / 'study_pareto.png'}")


def configs(argv: Sequence[str], prog: str | None = None) -> None:
    """Lists the shipped configs by name, each with the first line of its description: the run configs
    (``--config <name>``), then Accelerate's (``accelerate launch --config_file <path>``)."""
    if argv:
        raise SystemExit(f"usage: {prog or 'vlfuse configs'} (takes no arguments)")
    shipped = shipped_configs()
    runs = {n: p for n, p in shipped.items() if not n.startswith("accelerate/")}
    launch = {n: p for n, p in shipped.items() if n.startswith("accelerate/")}
    print("run configs (vlfuse train TASK --config <name>, vlfuse study --config <name>, ...):")
    for name, path in runs.items():
        print(f"  {name:<34} {_first_line(path)}".rstrip())
    print(
        f"\nAccelerate configs (accelerate launch --config_file {SHIPPED_CONFIGS}/<name>.yaml -m vlfuse ...):"
    )
    for name, path in launch.items():
        print(f"  {name:<34} {_first_line(path)}".rstrip())


def _first_line(path: Path, width: int = 72) -> str:
    """The first sentence of a config's leading comment, cut to ``width``."""
    lines = path.read_text().splitlines()
    text = lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else ""
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


USAGE = """usage: vlfuse <command> [options]

commands:
  train TASK   train a model: grounding, retrieval, vqa or itm ([--config FILE|NAME] [key=value ...])
  evaluate     score a trained model (model.init_from=...) on one or several splits
  predict      one image and texts -> the answer and a picture (vlfuse predict --help)
  compare      frozen vs end-to-end, side by side
  study        which mode (and towers) for this data: sizes x seeds, tuned, with a decision
  demo         a Gradio page for a saved model on 127.0.0.1 (pip install "vlfuse[demo]")
  configs      list the shipped configs (use one by name: --config grounding/refcoco_frozen)

`vlfuse <command> --help` lists a command's options and every config key with its default.
Several processes or GPUs: accelerate launch [--config_file F] -m vlfuse <command> ..."""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    prog = f"vlfuse {command}"
    try:
        if command == "train":
            if not rest or rest[0] not in TASKS:
                print(f"usage: vlfuse train {{{','.join(TASKS)}}} [--config FILE|NAME] [key=value ...]")
                raise SystemExit(0 if rest and rest[0] in ("-h", "--help") else 2)
            train_task(rest[0], rest[1:], prog=f"vlfuse train {rest[0]}")
        elif command == "predict":
            predict_main(rest, prog=prog)
        elif command == "demo":
            demo_main(rest, prog=prog)
        elif command in COMMANDS:
            COMMANDS[command](rest, prog=prog)
        else:
            raise SystemExit(f"vlfuse: unknown command {command!r}\n\n{USAGE}")
    except (*USER_ERRORS, StudyError) as err:  # a clear message, not a stack trace, for a bad config or data
        raise SystemExit(f"error: {err}") from None


COMMANDS: dict[str, Callable[..., None]] = {
    "evaluate": evaluate,
    "compare": compare,
    "study": study,
    "configs": configs,
}
