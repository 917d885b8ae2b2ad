"""Gradient caching's memory and speed: retrieval end-to-end on the realistic pair (resnet50 @224 px + a
6-layer 384-wide BERT, ``throughput.py``'s), a contrastive batch ``--factor`` times larger at about the
memory of the small one.

    python benchmarks/contrastive_batch.py                      # batch 16; 128 cached in chunks of 16
    python benchmarks/contrastive_batch.py --batch-size 32 --factor 8 --steps 3

Three runs, each in its own process (its peak memory its own: peak RSS on CPU, max_memory_allocated on
a GPU), of vlfuse's loop (``vlfuse.training.train``): batch B without caching, batch factor x B with
``train.contrastive_chunk_size=B``, and batch factor x B without caching (what the large batch costs
without it; ``--skip-uncached`` leaves it out where it would not fit). Printed: samples/s (steady state,
warm-up steps excluded), peak memory, and the ratios the target is about: peak memory of the cached large
batch / the small batch (target <= 1.2) and the samples/s the extra forward pass costs (cached / uncached
at the same batch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from throughput import _config, _peak_mb  # the realistic pair and the peak memory, as throughput.py has them


def run_one(args, batch_size: int, chunk: int | None, work: Path) -> dict:
    from vlfuse.training import train

    cfg = _config(args, "retrieval", "all", False, work)
    cfg.train.batch_size = batch_size
    cfg.train.contrastive_chunk_size = chunk
    cfg.data.shapes_train_size = max(args.train_images, batch_size * (args.warmup + args.steps))
    train(cfg)
    summary = json.loads((Path(cfg.train.output_dir) / "summary.json").read_text())
    return {"samples_per_s": summary["train_samples_per_s"], "peak_mb": _peak_mb()}


def measure(args, batch_size: int, chunk: int | None) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{batch_size}:{chunk or 0}"]
    for flag in ("steps", "warmup", "train_images"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit(f"batch {batch_size} chunk {chunk} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16, help="the small batch, and the chunk size")
    parser.add_argument("--factor", type=int, default=8, help="the large batch is this many small ones")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps excluded from the measurement")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--skip-uncached", action="store_true", help="leave out the uncached large batch")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "batch:chunk", print JSON
    args = parser.parse_args()
    args.preset, args.compile = "realistic", False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.one:
        batch, chunk = (int(v) for v in args.one.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_one(args, batch, chunk or None, Path(tmp))))
        return
    small, large = args.batch_size, args.batch_size * args.factor
    runs = [(f"batch {small}", small, None), (f"batch {large}, chunks of {small}", large, small)]
    if not args.skip_uncached:
        runs.append((f"batch {large}, no caching", large, None))
    results = {}
    for label, batch, chunk in runs:
        print(f"running {label} ...", flush=True)
        results[label] = measure(args, batch, chunk)
        r = results[label]
        print(f"  {r['samples_per_s']:.2f} samples/s, peak memory {r['peak_mb']:.0f} MiB", flush=True)
    base, cached = results[runs[0][0]], results[runs[1][0]]
    memory, speed = cached["peak_mb"] / base["peak_mb"], cached["samples_per_s"] / base["samples_per_s"]
    print(f"peak memory, batch {large} cached / batch {small}: {memory:.3f} (target <= 1.2)")
    print(f"samples/s, batch {large} cached / batch {small}: {speed:.3f}")
    if not args.skip_uncached:
        plain = results[runs[2][0]]
        print(
            f"peak memory, batch {large} uncached / batch {small}: {plain['peak_mb'] / base['peak_mb']:.3f}"
        )
        print(
            f"samples/s, batch {large} cached / uncached (the extra forward pass): "
            f"{cached['samples_per_s'] / plain['samples_per_s']:.3f}"
        )
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
