"""A study worker for the storage tests, run as a process of its own: the real engine (Optuna, the storage,
heartbeats, retries) over a stand-in for training that takes ``--seconds`` per trial and writes what a run
writes for the report (``summary.json``); ``--hang CELL`` never finishes that cell (a worker to kill).
``--ask N --at T`` only opens the study as a worker does, waits for the clock time T and takes N trials
(``study.ask``: the oldest waiting one, else a new one), printing their numbers.

    python tests/study_worker.py OUTPUT_DIR STORAGE_URL [--seconds S] [--hang CELL] [key=value ...]
    python tests/study_worker.py OUTPUT_DIR STORAGE_URL --ask N --at T [key=value ...]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import vlfuse.study
from vlfuse.config import load_config
from vlfuse.study.engine import open_study
from vlfuse.study.grid import cells

GRID = [
    "model.image_encoder.name=test_resnet",
    "model.image_encoder.pretrained=false",
    "model.text_encoder.name=vlfuse:tiny-bert",
    "model.text_encoder.pretrained=false",
    "study.modes=[none,all]",
    "study.train_sizes=[10,20]",
    "study.seeds=[0,1]",
    "study.lr_grid={none: [0.001], all: [0.0001]}",
    "study.heartbeat_interval=1",
    "study.grace_period=2",
]


def fake_value(cfg) -> float:
    """A deterministic metric: end-to-end gains with size; a seed moves it a little."""
    mode = cfg.model.trainable_encoders
    size = cfg.data.train_subset
    return (0.3 if mode == "none" else 0.2 + size / 50) + 0.01 * cfg.train.seed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("storage")
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--hang", default=None)
    parser.add_argument("--ask", type=int, default=0)
    parser.add_argument("--at", type=float, default=0.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # key=value overrides may follow the options

    def train(cfg, on_eval=None):
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        cell = out.relative_to(Path(args.output_dir) / "trials").as_posix()
        if args.hang and cell == args.hang:
            time.sleep(3600)
        time.sleep(args.seconds)
        value = fake_value(cfg)
        summary = {"trainable_parameters": 10 if cfg.model.trainable_encoders == "none" else 100}
        summary.update(wall_time_s=args.seconds, train_rows=int(cfg.data.train_subset))
        (out / "summary.json").write_text(json.dumps(summary))
        return {"holdout": {"acc@0.5": value}, "validation": {"acc@0.5": value}}

    vlfuse.study.train = train  # the engine under test, not training
    overrides = [
        *GRID,
        f"train.output_dir={args.output_dir}",
        f"study.storage={args.storage}",
        *args.overrides,
    ]
    cfg = load_config(overrides=overrides)
    if args.ask:
        study = open_study(cfg, cells(cfg))
        time.sleep(max(0.0, args.at - time.time()))
        print(json.dumps([study.ask().number for _ in range(args.ask)]))
        return
    result = vlfuse.study.run_study(cfg)
    print(json.dumps({"trials": result["trials"], "complete": result["complete"]}))


if __name__ == "__main__":
    sys.exit(main())
