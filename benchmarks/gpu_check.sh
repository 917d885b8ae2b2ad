#!/usr/bin/env bash
# One short GPU check (under 8 minutes on one GPU): the grounding recipe in bf16 for STEPS steps, frozen
# (none), frozen with the feature cache (none + cache: the towers stay on the CPU), LoRA on both towers and
# end-to-end (all), eager; then LoRA and all again with train.compile=true. It prints, per run, train
# samples/s, peak GPU memory, the FLOPs of a training step per sample, the fraction of the GPU's bf16
# matmul peak reached, Acc@0.5 and the last logged loss; and whether the compiled runs' losses equal the
# eager ones (same seed, same data order). Run from the repository root with the project installed:
#   bash benchmarks/gpu_check.sh [STEPS]        (default 300)
# Extra key=value overrides can follow in EXTRA, e.g. EXTRA="train.batch_size=128" bash benchmarks/gpu_check.sh
set -euo pipefail
steps=${1:-300}
out=${OUT:-runs}/gpu_check
python - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu_check.sh needs a CUDA GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
run() {  # name, then overrides
  local name=$1
  shift
  local start=$SECONDS
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    recipes/grounding.py train.mixed_precision=bf16 data.shapes_train_size=8000 data.shapes_eval_size=500 \
    train.max_steps="$steps" train.eval_every="$steps" train.checkpoint_every="$steps" train.log_every=10 \
    train.output_dir="$out/$name" data.num_workers=4 "$@" ${EXTRA:-} 2>&1 \
    | grep -E "^(done|eval |torch.compile|train.compile|channels-last)" || exit 1
  echo "$name: $((SECONDS - start)) s"
}
run none model.trainable_encoders=none
run none_cache model.trainable_encoders=none train.cache_features=true train.cache_dir="$out/cache"
run lora model.trainable_encoders=all model.image_encoder.tuning=lora model.text_encoder.tuning=lora
run all model.trainable_encoders=all
run lora_compiled model.trainable_encoders=all model.image_encoder.tuning=lora model.text_encoder.tuning=lora \
  train.compile=true
run all_compiled model.trainable_encoders=all train.compile=true
python - "$out" <<'PY'
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from throughput import flops_per_sample  # noqa: E402

from vlfuse.config import load_config  # noqa: E402
from vlfuse.training.speed import peak_matmul_flops  # noqa: E402

out = Path(sys.argv[1])
peak = peak_matmul_flops(torch.device("cuda"), torch.bfloat16, 8192)
print(f"bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
names = ("none", "none_cache", "lora", "all", "lora_compiled", "all_compiled")
header = f"{'run':<14} {'samples/s':>10} {'peak MiB':>9} {'GFLOP/sample':>13} {'of peak':>8} {'acc@0.5':>8} {'loss':>8}"
print(header)
losses = {}
for name in names:
    r = json.loads((out / name / "summary.json").read_text())
    cfg = load_config(out / name / "config.yaml")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        flops = flops_per_sample(cfg, "grounding", cache=cfg.train.cache_features)
    log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
    losses[name] = [row["loss"] for row in log]
    acc = r["metrics"].get("validation", {}).get("acc@0.5", float("nan"))
    frac = flops * r["train_samples_per_s"] / peak
    print(
        f"{name:<14} {r['train_samples_per_s']:>10.1f} {r['peak_memory_mb']:>9.0f} {flops / 1e9:>13.2f} "
        f"{frac:>8.2%} {acc:>8.3f} {losses[name][-1]:>8.4f}"
    )
for mode in ("lora", "all"):
    eager, compiled = losses[mode], losses[f"{mode}_compiled"]
    worst = max(abs(a - b) for a, b in zip(eager, compiled, strict=True))
    print(f"{mode}: compiled vs eager losses over {len(eager)} logged steps: largest difference {worst:.4f}"
          f" ({'equal within 0.05 (bf16)' if worst <= 0.05 else 'NOT equal within 0.05'})")
PY
