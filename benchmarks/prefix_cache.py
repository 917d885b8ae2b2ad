"""A tuned mode's cost, side by side: ``last_blocks`` with and without the prefix cache, and LoRA with and
without its fast layers.

    python benchmarks/prefix_cache.py                          # resnet50 @224 and vit_small_patch16_224
    python benchmarks/prefix_cache.py --towers resnet50 --steps 8 --batch-size 32

Grounding with the realistic text tower (a 6-layer, 384-wide BERT, random weights, frozen and cached as a
frozen tower is) and the default transformer fusion; random tower weights (speed does not depend on
them). Each measurement runs in its own process (peak memory is its own), through vlfuse's loop
(``vlfuse.training.train``):

- ``last_blocks``: the image tower trains its last ``--last-blocks`` blocks (the text tower frozen), with
  the prefix cache off (the whole tower runs every step: what a run did before the prefix cache) and on
  (float32, and float16 storage). The one-off caching time is reported apart. "Trainable part alone" is
  a bare loop over cached batches already in memory: the fusion, the head and the last blocks' forward
  and backward and the optimizer, no data loading; the cached run's step is compared with it.
  The final loss of the runs with and without the cache (same seed, float32) is printed: equal within
  1e-5 (float16 storage: its difference is printed). ``last_blocks, as before`` is the uncached run with
  ``train.reuse_cpu_memory=false`` too: a run as it was before either.
- ``LoRA`` on both towers (resnet50 only): peft's layers as injected and freed CPU memory not kept
  (``LoRA, before``: the fast LoRA layers and the frozen BatchNorm as an affine map switched off in that
  process, ``train.reuse_cpu_memory=false``), then vlfuse's layers (``vlfuse.encoders.fast``, ``LoRA, fast
  layers``), then with freed memory kept too (``LoRA``, the default), with the fraction of the machine's
  matmul peak each reaches.

Targets (ratios of one run): last_blocks with the cache >= 2x samples/s without it, its step <= 1.3x the
trainable part alone; LoRA >= 1.5x before. Every run but the "before" ones keeps freed CPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import _peak_mb, _text_encoder_folder, flops_per_sample, machine_peak  # noqa: E402

RUNS = [  # label, tower, mode, cache
    ("last_blocks, as before", "{tower}", "last_blocks_before", "off"),
    ("last_blocks, no prefix cache", "{tower}", "last_blocks", "off"),
    ("last_blocks + prefix cache", "{tower}", "last_blocks", "float32"),
    ("last_blocks + prefix cache fp16", "{tower}", "last_blocks", "float16"),
    ("trainable part alone", "{tower}", "bare", "float32"),
]
LORA_RUNS = [
    ("LoRA, before", "resnet50", "lora_before", "off"),
    ("LoRA, fast layers", "resnet50", "lora_fast", "off"),
    ("LoRA", "resnet50", "lora", "off"),
]
BEFORE = ("last_blocks_before", "lora_before", "lora_fast")  # freed CPU memory not kept (as before)


def _config(args, tower: str, mode: str, cache: str, work: Path):
    from vlfuse.config import load_config

    steps = args.lora_steps if mode.startswith("lora") else args.steps
    tuning = {
        "last_blocks": [
            "model.trainable_encoders=image",
            "model.image_encoder.tuning=last_blocks",
            f"model.image_encoder.last_blocks={args.last_blocks}",
        ],
        "lora": [
            "model.trainable_encoders=all",
            "model.image_encoder.tuning=lora",
            "model.text_encoder.tuning=lora",
        ],
    }
    tuning["bare"] = tuning["last_blocks_before"] = tuning["last_blocks"]
    tuning["lora_before"] = tuning["lora_fast"] = tuning["lora"]
    overrides = [
        *tuning[mode],
        f"train.reuse_cpu_memory={str(mode not in BEFORE).lower()}",
        "data.dataset=shapes",
        f"model.image_encoder.name={tower}",
        "model.image_encoder.pretrained=false",
        "model.image_encoder.image_size=224",
        f"model.text_encoder.name={_text_encoder_folder('realistic', work / 'bert')}",
        "model.text_encoder.pretrained=false",
        "model.text_encoder.max_length=16",
        "model.fusion.name=transformer",
        f"train.cache_features={str(mode.startswith('last') or mode == 'bare').lower()}",
        f"train.cache_dtype={'float16' if cache == 'float16' else 'float32'}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.warmup + steps}",
        "train.log_every=1",
        "train.eval_every=1000000",
        "train.checkpoint_every=1000000",
        f"train.output_dir={work / 'run'}",
        f"train.cache_dir={work / ('cache16' if cache == 'float16' else 'cache')}",
        f"data.shapes_train_size={args.train_images}",
        "data.shapes_eval_size=8",
        "data.max_eval_samples=8",
    ]
    return load_config(None, overrides)


def switch_off_prefix_cache() -> None:
    import vlfuse.data.feature_cache as feature_cache

    feature_cache.prefix_cacheable = lambda model, accelerator, tower="image": False


def switch_off_fast_layers() -> None:
    import vlfuse.encoders.image as image
    import vlfuse.encoders.tuning as tuning

    image.frozen_batchnorm_as_affine = lambda module: 0
    tuning.use_fast_lora = lambda module: 0


def _build_cache(cfg, task: str) -> float:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vlfuse.data.feature_cache import cached_dataset
    from vlfuse.model import VLFuseModel
    from vlfuse.tasks import get_task

    torch.manual_seed(cfg.train.seed)
    model = VLFuseModel(cfg.model)
    dataset = get_task(task).build_dataset(cfg, model, "train", train=True)
    start = time.perf_counter()
    cached_dataset(model, dataset, "train", cfg.train.cache_dir, cfg.train.cache_dtype, 64, Accelerator())
    AcceleratorState._reset_state(True)
    return time.perf_counter() - start


def run_vlfuse(args, tower: str, mode: str, cache: str, work: Path) -> dict:
    from accelerate.state import AcceleratorState

    from vlfuse.training import train

    if mode == "lora_before":
        switch_off_fast_layers()
    if mode.startswith("last") and cache == "off":  # last_blocks and last_blocks_before
        switch_off_prefix_cache()
    cfg = _config(args, tower, mode, cache, work)
    caching_s = _build_cache(cfg, "grounding") if cfg.train.cache_features else 0.0
    train(cfg)
    AcceleratorState._reset_state(True)
    run = Path(cfg.train.output_dir)
    summary = json.loads((run / "summary.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log]
    # the measured steps: those after the warm-up (the log holds each step's own rate, log_every=1)
    s_per_step = sum(args.batch_size / row["samples_per_s"] for row in log[args.warmup :]) / len(
        log[args.warmup :]
    )
    folders = [p for p in Path(cfg.train.cache_dir).glob("train-image*") if p.is_dir()]
    cache_mb = sum(f.stat().st_size for p in folders for f in p.iterdir()) / 2**20
    stats = json.loads((folders[0] / "cache.json").read_text())["stats"] if folders else {}
    return {
        "samples_per_s": args.batch_size / s_per_step,
        "s_per_step": s_per_step,
        "peak_mb": _peak_mb(),
        "caching_s": caching_s,
        "cache_mb": cache_mb,
        "cache_entries": stats.get("entries"),
        "losses": losses,
        "miou": summary["metrics"]["validation"]["miou"],
        "flops_per_sample": flops_per_sample(cfg, "grounding", cfg.train.cache_features),
    }


def run_bare(args, tower: str, mode: str, cache: str, work: Path) -> dict:
    """The trainable part alone: cached batches held in memory, forward, backward and optimizer only."""
    import torch
    from accelerate import Accelerator

    from vlfuse.data.feature_cache import cached_dataset
    from vlfuse.model import VLFuseModel
    from vlfuse.tasks import get_task
    from vlfuse.training.speed import optimizer_options, reuse_freed_cpu_memory

    cfg = _config(args, tower, "bare", cache, work)
    reuse_freed_cpu_memory()  # as the cached run it is compared with
    torch.manual_seed(cfg.train.seed)
    task = get_task("grounding")
    model = VLFuseModel(cfg.model)
    dataset = task.build_dataset(cfg, model, "train", train=True)
    dataset = cached_dataset(model, dataset, "train", cfg.train.cache_dir, "float32", 64, Accelerator())
    model.place("cpu", keep_on_cpu=["text"]).train()
    collate = task.collator(model, train=True)
    n = args.batch_size
    batches = [collate([dataset[(i * n + j) % len(dataset)] for j in range(n)]) for i in range(4)]
    for b in batches:
        b.pop("bad_rows")
    groups = model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, **optimizer_options(params, cfg.train.fused_optimizer))
    steps = args.steps
    start = None
    for i in range(args.warmup + steps):
        if i == args.warmup:
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        loss, _ = task.loss(model(**batch), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * n / elapsed, "s_per_step": elapsed / steps, "peak_mb": _peak_mb()}


def _measure(args, label: str, run: tuple[str, str, str], work: Path) -> dict:
    tower, mode, cache = run
    cmd = [sys.executable, __file__, "--one", f"{tower}:{mode}:{cache}"]
    for flag in ("steps", "lora_steps", "warmup", "batch_size", "train_images", "last_blocks"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    # the runs of one tower share its caches (the bare loop reads the float32 prefix cache)
    env = {**os.environ, "VLFUSE_BENCH_WORK": str(work / f"{tower}-{mode}-{cache}")}
    if mode == "bare":
        env["VLFUSE_BENCH_WORK"] = str(work / f"{tower}-last_blocks-float32")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit(f"{label} ({tower}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--towers", default="resnet50,vit_small_patch16_224", help="comma-separated timm names"
    )
    parser.add_argument("--last-blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="measured steps of the last_blocks runs")
    parser.add_argument("--lora-steps", type=int, default=6, help="measured steps of the LoRA runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=320, help="embedded train images (cache size)")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.one:
        tower, mode, cache = args.one.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(os.environ.get("VLFUSE_BENCH_WORK", tmp))
            runner = run_bare if mode == "bare" else run_vlfuse
            print("RESULT " + json.dumps(runner(args, tower, mode, cache, work)))
        return
    peaks = machine_peak()
    peak = peaks["float32"]
    print(f"peak matmul: {peak / 1e9:.1f} GFLOP/s float32", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vlfuse-prefix-"))
    plan = [
        (label, tower_, mode, cache) for tower_ in args.towers.split(",") for label, _, mode, cache in RUNS
    ]
    if not args.no_lora:
        plan += LORA_RUNS
    rows: dict[tuple[str, str], dict] = {}
    for label, tower, mode, cache in plan:
        print(f"running {tower}: {label} ...", flush=True)
        rows[(tower, label)] = _measure(args, label, (tower, mode, cache), work)
    _report(args, rows, peak)


def _report(args, rows: dict, peak: float) -> None:
    print(f"\nbatch {args.batch_size}, last {args.last_blocks} blocks of the image tower, text tower frozen:")
    print(
        f"{'tower':<24} {'run':<34} {'samples/s':>9} {'s/step':>7} {'% peak':>6} {'peak MB':>8} "
        f"{'cache MB':>8}"
    )
    for (tower, label), r in rows.items():
        frac = r["samples_per_s"] * r["flops_per_sample"] / peak if r.get("flops_per_sample") else None
        cache = f"{r['cache_mb']:.0f}" if r.get("cache_mb") else "-"
        print(
            f"{tower:<24} {label:<34} {r['samples_per_s']:9.1f} {r['s_per_step']:7.3f} "
            f"{'-' if frac is None else f'{100 * frac:.1f}':>6} {r['peak_mb']:8.0f} {cache:>8}"
        )
    print("\ntargets:")
    towers = sorted({t for t, _ in rows if (t, "last_blocks + prefix cache") in rows})
    for tower in towers:
        off, on = rows[(tower, "last_blocks, no prefix cache")], rows[(tower, "last_blocks + prefix cache")]
        alone, half = rows[(tower, "trainable part alone")], rows[(tower, "last_blocks + prefix cache fp16")]
        before = rows[(tower, "last_blocks, as before")]
        print(
            f"  {tower}: prefix cache / none samples/s: "
            f"{on['samples_per_s'] / off['samples_per_s']:.2f}x (>= 2); / last_blocks as before (no "
            f"cache, freed memory not kept): {on['samples_per_s'] / before['samples_per_s']:.2f}x"
        )
        print(
            f"  {tower}: cached step / trainable part alone: "
            f"{on['s_per_step'] / alone['s_per_step']:.2f}x (<= 1.3)"
        )
        n = len(off["losses"])  # same seed, same steps (and so the same learning-rate schedule)
        a, b, c = off["losses"][-1], on["losses"][-1], half["losses"][-1]
        print(
            f"  {tower}: final loss (step {n}) without / with the cache: {a:.6f} / {b:.6f} "
            f"(|diff| {abs(a - b):.1e}); "
            f"float16 storage: {c:.6f} (|diff| {abs(a - c):.1e}), {half['cache_mb']:.0f} MiB"
        )
        print(f"  {tower}: final eval mIoU without / with the cache: {off['miou']:.6f} / {on['miou']:.6f}")
        print(f"  {tower}: caching the prefix took {on['caching_s']:.1f} s for {on['cache_entries']} images")
    if ("resnet50", "LoRA") in rows:
        before, after = rows[("resnet50", "LoRA, before")], rows[("resnet50", "LoRA")]
        fast = rows[("resnet50", "LoRA, fast layers")]
        print(
            f"  LoRA / LoRA before samples/s: {after['samples_per_s'] / before['samples_per_s']:.2f}x "
            f"(>= 1.5); the fast layers alone {fast['samples_per_s'] / before['samples_per_s']:.2f}x, "
            f"then freed memory kept {after['samples_per_s'] / fast['samples_per_s']:.2f}x"
        )
        a, b = before["losses"][-1], after["losses"][-1]
        print(f"  final loss LoRA before / LoRA: {a:.6f} / {b:.6f} (|diff| {abs(a - b):.1e})")


if __name__ == "__main__":
    main()
