"""VQA-style classification: train an image + question -> answer classifier.

    accelerate launch recipes/vqa.py [--config FILE] [key=value ...]
    python recipes/vqa.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on questions about the embedded offline dataset (recipes/configs/vqa/shapes.yaml)
and prints the accuracy next to the majority-answer baseline.
"""

import sys

from vlfuse.cli import train_task
from vlfuse.training import USER_ERRORS


def main(argv: list[str], on_end=None) -> None:
    train_task("vqa", argv, on_end=on_end)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
