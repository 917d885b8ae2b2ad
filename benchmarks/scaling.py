"""Two processes on one machine: DDP vs FSDP2 (the shipped CPU configs), and a streamed train split vs the
same split loaded whole; train samples/s and every process's peak memory, side by side in one run.

    python benchmarks/scaling.py                       # resnet50 @128 px + a 6-layer 384-wide BERT
    python benchmarks/scaling.py --steps 30 --modes all --batch-size 8

Each row is one ``accelerate launch`` of recipes/grounding.py on the embedded dataset with 2 processes:
``ddp`` (recipes/configs/accelerate/cpu_2proc.yaml), ``fsdp2`` (cpu_2proc_fsdp.yaml: parameters,
gradients and optimizer state sharded per parameter), and ``ddp+stream`` (DDP with data.streaming=true:
the split read as a stream, each process its own shards). On a GPU machine, pass --ddp-config and
--fsdp-config to use GPU configs. Samples/s are the loop's steady state (summary.json's
train_samples_per_s: after the first logging window, evaluation excluded), over both processes; memory is
each process's peak RSS (CPU) or max_memory_allocated (GPU), from summary.json's
peak_memory_mb_per_process; and the weights and optimizer state each process holds at the end
(weights_and_optimizer_mib_per_process: FSDP2 holds a shard of each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _text_encoder_folder  # noqa: E402

CONFIGS = ROOT / "recipes" / "configs" / "accelerate"


def run(args, strategy: str, mode: str, work: Path, text_encoder: str) -> dict:
    out = work / f"{strategy}-{mode}".replace("+", "_")
    config = args.fsdp_config if strategy == "fsdp2" else args.ddp_config
    overrides = [
        "--config",
        str(ROOT / "recipes/configs/grounding/shapes.yaml"),
        f"model.image_encoder.name={args.image_encoder}",
        f"model.image_encoder.image_size={args.image_size}",
        "model.image_encoder.kwargs={}",
        f"model.text_encoder.name={text_encoder}",
        f"model.trainable_encoders={mode}",
        f"data.shapes_image_size={args.image_size}",
        "data.shapes_train_size=2000",
        "data.max_eval_samples=16",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=0",
        f"train.log_every={args.warmup}",
        "train.eval_every=null",
        "train.checkpoint_every=null",
        f"train.output_dir={out}",
    ]
    if strategy == "ddp+stream":
        overrides += ["data.streaming=true", "data.shuffle_buffer=256"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if args.cpu else dict(os.environ)
    cmd = ["accelerate", "launch", "--config_file", str(config), str(ROOT / "recipes/grounding.py")]
    result = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{strategy} {mode} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--image-encoder", default="resnet50")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--preset", default="realistic", choices=["realistic", "default"])
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady rate")
    parser.add_argument("--modes", default="all,none")
    parser.add_argument("--strategies", default="ddp,fsdp2,ddp+stream")
    parser.add_argument("--ddp-config", default=CONFIGS / "cpu_2proc.yaml")
    parser.add_argument("--fsdp-config", default=CONFIGS / "cpu_2proc_fsdp.yaml")
    parser.add_argument("--gpu", dest="cpu", action="store_false", help="do not set ACCELERATE_USE_CPU")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlfuse-scaling-") as tmp:
        work = Path(tmp)
        text_encoder = _text_encoder_folder(args.preset, work / "text_encoder")
        for mode in args.modes.split(","):
            for strategy in args.strategies.split(","):
                summary = run(args, strategy, mode, work, text_encoder)
                rows.append((mode, strategy, summary))
                peaks = ", ".join(f"{p:,.0f}" for p in summary["peak_memory_mb_per_process"])
                held = ", ".join(f"{h:,.0f}" for h in summary["weights_and_optimizer_mib_per_process"])
                print(
                    f"{mode:>5} {strategy:>10}: {summary['train_samples_per_s']:7.1f} samples/s, "
                    f"peak {peaks} MiB per process ({summary['peak_memory_kind']}), "
                    f"weights + optimizer state {held} MiB per process, "
                    f"{summary['trainable_parameters']:,} trainable parameters",
                    flush=True,
                )
    print("\nratios to DDP (same mode, same run):")
    for mode in args.modes.split(","):
        base = next((s for m, st, s in rows if m == mode and st == "ddp"), None)
        if base is None:
            continue
        for m, strategy, s in rows:
            if m != mode or strategy == "ddp":
                continue
            rate = s["train_samples_per_s"] / base["train_samples_per_s"]
            peak = max(s["peak_memory_mb_per_process"]) / max(base["peak_memory_mb_per_process"])
            key = "weights_and_optimizer_mib_per_process"
            held = max(s[key]) / max(base[key])
            print(
                f"{mode:>5} {strategy:>10}: samples/s x{rate:.2f}, peak memory per process x{peak:.2f}, "
                f"weights + optimizer state per process x{held:.2f}"
            )


if __name__ == "__main__":
    main()
