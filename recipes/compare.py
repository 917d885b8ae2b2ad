"""Frozen vs end-to-end: train the same task, data, head and budget for each trainable_encoders value.

    accelerate launch recipes/compare.py [--config FILE] [key=value ...]
    python recipes/compare.py compare.modes=[none,all] train.max_steps=500

Writes train.output_dir/{comparison.md, comparison.json, comparison.png} and keeps each mode's run folder
(train.output_dir/<mode>). With no --config, compares on the embedded dataset (shapes.yaml) at a smaller
budget.
"""

import sys

from vlfuse.cli import compare
from vlfuse.training import USER_ERRORS


def main(argv: list[str]) -> None:
    compare(argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
