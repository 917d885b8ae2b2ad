"""Runs recipes/grounding.py's main, recording the texts of every training batch per process
(``seen_rank<N>.jsonl`` in train.output_dir, a line per batch, in order) so a test can check what each
process saw. Use with data.num_workers=0: workers would prefetch (and record) batches never trained on."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from grounding import main  # noqa: E402

from vlfuse.config import load_config, parse_cli  # noqa: E402
from vlfuse.tasks import grounding as grounding_task  # noqa: E402

_, OVERRIDES = parse_cli(sys.argv[1:])
OUT = Path(load_config(None, OVERRIDES).train.output_dir)


class RecordingCollator(grounding_task.GroundingCollator):
    def __call__(self, examples):
        batch = super().__call__(examples)
        if not self.keep_bad:  # a training batch
            with open(OUT / f"seen_rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
                f.write(json.dumps([e.text for e in examples]) + "\n")
        return batch


grounding_task.GroundingCollator = RecordingCollator

if __name__ == "__main__":
    main(sys.argv[1:])
