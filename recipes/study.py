"""Which mode for my data? Modes x train sizes x seeds, each mode's learning rate tuned on held-out train
rows, with confidence intervals and a recommendation.

    python recipes/study.py [--config FILE] [key=value ...]
    python recipes/study.py --config retrieval/real_encoders_study.yaml    # a shipped config, by name
    python recipes/study.py study.storage=postgresql://user@db-host/studies   # on every worker machine

Writes train.output_dir/{study.md, study.json, study_curves.png, study_cost.png, study_pareto.png} and
each trial's run folder (train.output_dir/trials/...). The trials are recorded in a study storage
(SQLite in the output folder unless study.storage says otherwise): running the command again continues
the study, and once every trial has finished only rewrites the report. With no --config, studies the
embedded dataset (grounding/shapes_study) at a budget that finishes in about 16 minutes on a 2-core CPU.
"""

import sys

from vlfuse.cli import study
from vlfuse.study import StudyError
from vlfuse.training import USER_ERRORS


def main(argv: list[str]) -> None:
    study(argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (*USER_ERRORS, StudyError) as err:
        sys.exit(f"error: {err}")
