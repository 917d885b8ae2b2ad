#!/usr/bin/env bash
# One short GPU check: the grounding recipe for a few hundred steps in bf16, frozen (none) and end-to-end
# (all), printing train samples/s and peak GPU memory for each. Run from the repository root on a machine
# with a GPU and the project installed:
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
for mode in none all; do
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    recipes/grounding.py model.trainable_encoders="$mode" train.mixed_precision=bf16 \
    train.max_steps="$steps" train.eval_every="$steps" train.checkpoint_every="$steps" \
    train.output_dir="$out/$mode" data.num_workers=4 ${EXTRA:-} 2>&1 | grep -vE '^\s*$|it/s' || exit 1
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads((Path(sys.argv[1]) / m / "summary.json").read_text()) for m in ("none", "all")]
print(f"{'mode':<6} {'samples/s':>10} {'peak MiB':>10} {'acc@0.5':>8}")
for r in rows:
    acc = r["metrics"].get("validation", {}).get("acc@0.5", float("nan"))
    print(f"{r['trainable_encoders']:<6} {r['train_samples_per_s']:>10.1f} {r['peak_memory_mb']:>10.0f} {acc:>8.3f}")
print(f"none/all samples/s: {rows[0]['train_samples_per_s'] / rows[1]['train_samples_per_s']:.2f}x")
PY
