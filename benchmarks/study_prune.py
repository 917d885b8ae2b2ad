"""What ``study.prune`` saves: the same study twice, side by side, without and with the pruner.

    python benchmarks/study_prune.py [key=value ...]

The study is the embedded default's (``recipes/configs/grounding/shapes_study.yaml``) narrowed to the
frozen mode at one train size and three seeds, with a rate grid where one rate is clearly worse
(1e-4, 1e-3, 3e-3), evaluating every 50 of its 250 steps. Each arm has its own output folder and study
storage; the feature cache is shared (built before either arm, so neither pays for it). Prints each arm's
wall time, the trials the pruner stopped, the training steps run, and the chosen rate and reported mean,
which pruning must not change.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from vlfuse.config import load_config  # noqa: E402
from vlfuse.study import run_study  # noqa: E402
from vlfuse.study.grid import Cell, trial_config  # noqa: E402
from vlfuse.training import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "grounding" / "shapes_study.yaml"
NARROW = [
    "study.modes=[none]",
    "study.train_sizes=[2700]",
    "study.seeds=[0,1,2]",
    "study.lr_grid={none: [0.0001, 0.001, 0.003]}",
    "train.eval_every=50",
]


def steps_run(folder: Path) -> int:
    return sum(json.loads(p.read_text())["steps"] for p in folder.glob("trials/**/summary.json"))


def main(argv: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="vlfuse-prune-"))
    cache = f"train.cache_dir={work / 'cache'}"
    base = load_config(CONFIG, [*NARROW, cache, *argv])
    for seed in base.study.seeds:  # the towers' cache of each seed, built before either arm
        warm = trial_config(base, Cell("none", 2700.0, seed, 1e-3), work / "warm")
        warm.train.max_steps = 1
        train(warm)
    rows = []
    for prune in (False, True):
        out = work / ("pruned" if prune else "full")
        cfg = load_config(CONFIG, [*NARROW, cache, f"train.output_dir={out}", f"study.prune={prune}", *argv])
        start = time.perf_counter()
        result = run_study(cfg)
        wall = time.perf_counter() - start
        records = json.loads((out / "study.json").read_text())["records"]
        row = result["summary"]["rows"][0]
        rows.append((prune, wall, sum(bool(r["pruned"]) for r in records), steps_run(out), row))
    print("\nstudy.prune | wall time (s) | trials stopped | training steps | chosen lr | mean (95% CI)")
    for prune, wall, stopped, steps, row in rows:
        print(
            f"{prune!s:>11} | {wall:13.1f} | {stopped:14d} | {steps:14d} | {row['lr']:9.3g} | "
            f"{row['mean']:.4f} [{row['low']:.4f}, {row['high']:.4f}]"
        )
    print(f"wall time with the pruner / without: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
