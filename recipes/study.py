"""Which mode for my data? Modes x train sizes x seeds, each mode's learning rate tuned on held-out train
rows, with confidence intervals and a recommendation.

    python recipes/study.py [--config FILE] [key=value ...]
    python recipes/study.py --config recipes/configs/grounding/real_encoders_study.yaml
    python recipes/study.py study.storage=postgresql://user@db-host/studies   # on every worker machine

Writes train.output_dir/{study.md, study.json, study_curves.png, study_cost.png} and each trial's run
folder (train.output_dir/trials/...). The trials are recorded in a study storage (SQLite in the output
folder unless study.storage says otherwise): running the command again continues the study, and once
every trial has finished only rewrites the report. With no --config, studies the embedded dataset
(shapes.yaml) at a budget that finishes in about 20 minutes on a 2-core CPU.
"""

import sys
from pathlib import Path

from vlfuse.config import load_cli_config
from vlfuse.study import StudyError, run_study
from vlfuse.training import USER_ERRORS

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grounding" / "shapes_study.yaml"


def main(argv: list[str]) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG)
    run_study(cfg)
    out = Path(cfg.train.output_dir)
    if (out / "study.md").is_file():
        print((out / "study.md").read_text())
        print(f"plots: {out / 'study_curves.png'}, {out / 'study_cost.png'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (*USER_ERRORS, StudyError) as err:
        sys.exit(f"error: {err}")
