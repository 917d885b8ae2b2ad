"""Image-text retrieval: train a shared image/text embedding with a contrastive loss.

    accelerate launch recipes/retrieval.py [--config FILE] [key=value ...]
    python recipes/retrieval.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on captions of the embedded offline dataset (recipes/configs/retrieval/shapes.yaml)
and prints Recall@1 next to chance.
"""

import sys

from vlfuse.cli import train_task
from vlfuse.training import USER_ERRORS


def main(argv: list[str], on_end=None) -> None:
    train_task("retrieval", argv, on_end=on_end)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
