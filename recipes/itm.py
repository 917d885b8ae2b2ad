"""Image-text matching (ITM): train an image + text -> "does the text describe the image?" classifier.

    accelerate launch recipes/itm.py [--config FILE] [key=value ...]
    python recipes/itm.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on captions of the embedded offline dataset (recipes/configs/itm/shapes.yaml)
and prints accuracy and ROC-AUC next to chance (0.5).
"""

import sys

from vlfuse.cli import train_task
from vlfuse.training import USER_ERRORS


def main(argv: list[str], on_end=None) -> None:
    train_task("itm", argv, on_end=on_end)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
