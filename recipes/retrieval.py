"""Image-text retrieval: train a shared image/text embedding with a contrastive loss.

    accelerate launch recipes/retrieval.py [--config FILE] [key=value ...]
    python recipes/retrieval.py model.trainable_encoders=none train.max_steps=200

With no --config, trains on captions of the embedded offline dataset (recipes/configs/retrieval/shapes.yaml)
and prints Recall@1 next to chance.
"""

import sys
from pathlib import Path

from accelerate import PartialState

from vlfuse.config import load_cli_config
from vlfuse.training import USER_ERRORS, format_metrics, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "retrieval" / "shapes.yaml"


def main(argv: list[str], on_end=None) -> None:
    cfg = load_cli_config(argv, DEFAULT_CONFIG, task="retrieval")
    metrics = train(cfg, on_end=on_end)
    PartialState().print(format_metrics(metrics))  # once, not once per process
    for split, m in metrics.items():
        chance = m["chance_r1"]
        print(
            f"{split}: text->image R@1 {m['t2i_r@1']:.4f}, image->text R@1 {m['i2t_r@1']:.4f}; chance "
            f"{chance:.4f} (1/{m['images']} images): {m['t2i_r@1'] / chance:.1f}x and "
            f"{m['i2t_r@1'] / chance:.1f}x chance"
        )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:  # a clear message, not a stack trace, for a problem in the config or data
        sys.exit(f"error: {err}")
