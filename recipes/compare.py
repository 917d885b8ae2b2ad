"""Frozen vs end-to-end: train the same task, data, head and budget for each trainable_encoders value.

    accelerate launch recipes/compare.py [--config FILE] [key=value ...]
    python recipes/compare.py compare.modes=[none,all] train.max_steps=500

Writes train.output_dir/{comparison.md, comparison.json, comparison.png} and keeps each mode's run folder
(train.output_dir/<mode>). With no --config, compares on the embedded dataset (shapes.yaml) at a smaller
budget.
"""

import sys
from pathlib import Path

from vlfuse.compare import run_comparison
from vlfuse.config import load_cli_config
from vlfuse.training import USER_ERRORS

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grounding" / "shapes.yaml"
# The embedded default's budget, split over four runs.
DEFAULT_OVERRIDES = ["train.output_dir=runs/compare", "train.max_steps=400", "train.eval_every=100"]


def main(argv: list[str]) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG, DEFAULT_OVERRIDES)
    run_comparison(cfg)
    print((Path(cfg.train.output_dir) / "comparison.md").read_text())
    print(f"plot: {Path(cfg.train.output_dir) / 'comparison.png'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
