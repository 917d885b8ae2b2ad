#!/usr/bin/env bash
# One short GPU check: the grounding recipe for a few hundred steps in bf16, frozen (none), frozen with the
# feature cache (none + cache: the towers stay on the CPU) and end-to-end (all), printing train samples/s,
# peak GPU memory and the weights held on the GPU for each. Run from the repository root on a machine with
# a GPU and the project installed:
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
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    recipes/grounding.py train.mixed_precision=bf16 \
    train.max_steps="$steps" train.eval_every="$steps" train.checkpoint_every="$steps" \
    train.output_dir="$out/$name" data.num_workers=4 "$@" ${EXTRA:-} 2>&1 | grep -vE '^\s*$|it/s' || exit 1
}
run none model.trainable_encoders=none
run none_cache model.trainable_encoders=none train.cache_features=true train.cache_dir="$out/cache"
run all model.trainable_encoders=all
python - "$out" <<'PY'
import json, sys
from pathlib import Path
names = ("none", "none_cache", "all")
rows = {n: json.loads((Path(sys.argv[1]) / n / "summary.json").read_text()) for n in names}
print(f"{'run':<11} {'samples/s':>10} {'peak MiB':>10} {'weights on GPU MiB':>19} {'acc@0.5':>8}")
for name, r in rows.items():
    acc = r["metrics"].get("validation", {}).get("acc@0.5", float("nan"))
    weights = r.get("accelerator_weights_mib") or float("nan")
    print(f"{name:<11} {r['train_samples_per_s']:>10.1f} {r['peak_memory_mb']:>10.0f} {weights:>19.1f} {acc:>8.3f}")
none, cached, e2e = (rows[n] for n in names)
print(f"none/all samples/s: {none['train_samples_per_s'] / e2e['train_samples_per_s']:.2f}x")
print(f"none+cache/none peak GPU memory: {cached['peak_memory_mb'] / none['peak_memory_mb']:.2f}x")
PY
