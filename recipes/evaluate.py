"""Score a trained model on one or several splits, without training.

    accelerate launch recipes/evaluate.py --config recipes/configs/grounding/lmms_refcoco_eval.yaml \\
        model.init_from=runs/grounding/final
    python recipes/evaluate.py model.init_from=runs/grounding/final data.eval_split=[validation,test]

Metrics are printed per split and appended to train.output_dir/metrics.jsonl.
"""

import sys

from vlfuse.cli import evaluate
from vlfuse.training import USER_ERRORS


def main(argv: list[str]) -> None:
    evaluate(argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
