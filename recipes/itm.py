"""Image-text matching (ITM): train an image + text -> "does the text describe the image?" classifier.

    accelerate launch recipes/itm.py [--config FILE] [key=value ...]
    python recipes/itm.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on captions of the embedded offline dataset (recipes/configs/itm/shapes.yaml)
and prints accuracy and ROC-AUC next to chance (0.5).
"""

import sys
from pathlib import Path

from accelerate import PartialState

from vlfuse.config import load_cli_config
from vlfuse.training import USER_ERRORS, format_metrics, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "itm" / "shapes.yaml"


def main(argv: list[str]) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG, task="itm")
    metrics = train(cfg)
    PartialState().print(format_metrics(metrics))  # once, not once per process
    for split, m in metrics.items():
        print(
            f"{split}: accuracy {m['accuracy']:.4f}, ROC-AUC {m['roc_auc']:.4f} over {m['pairs']:,} pairs "
            "(half matching, half not); chance 0.5 for both"
        )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
