"""Score a trained model on one or several splits, without training.

    accelerate launch recipes/evaluate.py --config recipes/configs/grounding/lmms_refcoco_eval.yaml \\
        model.init_from=runs/grounding/final
    python recipes/evaluate.py model.init_from=runs/grounding/final data.eval_split=[validation,test]

Metrics are printed per split and appended to train.output_dir/metrics.jsonl.
"""

import sys
from pathlib import Path

from accelerate import PartialState

from vlfuse.config import load_cli_config
from vlfuse.training import USER_ERRORS, evaluate_saved, format_metrics

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grounding" / "shapes.yaml"


def main(argv: list[str]) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG)
    results = evaluate_saved(cfg)
    PartialState().print(format_metrics(results))  # once, not once per process


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
