"""Visual grounding: train a referring-expression -> box model.

    accelerate launch recipes/grounding.py [--config FILE] [key=value ...]
    python recipes/grounding.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on the embedded offline dataset (recipes/configs/grounding/shapes.yaml).
"""

import sys
from pathlib import Path

from accelerate import PartialState

from vlfuse.config import load_cli_config
from vlfuse.training import USER_ERRORS, format_metrics, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grounding" / "shapes.yaml"


def main(argv: list[str], on_end=None) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG, task="grounding")
    metrics = train(cfg, on_end=on_end)
    PartialState().print(format_metrics(metrics))  # once, not once per process


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
