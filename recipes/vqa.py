"""VQA-style classification: train an image + question -> answer classifier.

    accelerate launch recipes/vqa.py [--config FILE] [key=value ...]
    python recipes/vqa.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on questions about the embedded offline dataset (recipes/configs/vqa/shapes.yaml)
and prints the accuracy next to the majority-answer baseline.
"""

import sys
from pathlib import Path

from accelerate import PartialState

from vlfuse.config import load_cli_config
from vlfuse.training import USER_ERRORS, format_metrics, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "vqa" / "shapes.yaml"


def main(argv: list[str], on_end=None) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG, task="vqa")
    metrics = train(cfg, on_end=on_end)
    PartialState().print(format_metrics(metrics))  # once, not once per process
    for split, m in metrics.items():
        baseline = m["majority_baseline"]
        ratio = m["accuracy"] / baseline if baseline > 0 else float("inf")
        print(
            f"{split}: accuracy {m['accuracy']:.4f}; majority-answer baseline {baseline:.4f} "
            f"(always the most frequent train answer): {ratio:.2f}x"
        )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
