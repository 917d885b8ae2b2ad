"""Train throughput against the machine's limit, peak memory and checkpoint size: end-to-end, frozen,
frozen + feature cache and LoRA, with the speed options on and off, and a bare PyTorch loop, for grounding
and retrieval.

    python benchmarks/throughput.py                   # resnet50 @224 px + a 6-layer 384-wide BERT
    python benchmarks/throughput.py --preset default  # the embedded default model (shapes.yaml)
    python benchmarks/throughput.py --steps 20 --warmup 3 --batch-size 32 --tasks grounding

The machine's limit: the FLOP/s of a large square matmul in float32 with the runs' threads (on a GPU also
in bfloat16), measured first. Each run's FLOPs per sample are counted on one training step
(``torch.utils.flop_counter``: forward and backward of the towers that run, the fusion and the head); its
achieved FLOP/s is that times its samples/s, printed as a fraction of the peak beside samples/s.

Each measurement runs in its own process (so peak memory is its own): vlfuse's loop (`vlfuse.training.train`,
Accelerate included) for trainable_encoders=all, none, none with train.cache_features=true (the one-off
caching time reported separately) and LoRA on both towers; end-to-end and LoRA also with the speed options
off (train.channels_last, train.fused_optimizer and train.compile off, as before they existed) and on
(channels_last and the fused optimizer by default, plus train.compile=true with --compile); for grounding
the same modules in a bare PyTorch loop (plain DataLoader, AdamW, no Accelerate) as the floor. Retrieval
(the projection fusion over pooled vectors, LiT-style) is measured end-to-end and frozen + cache. Train
samples/s are steady state (warm-up steps excluded, evaluation excluded); cached runs measure ten times as
many steps (they are that much shorter). Peak memory is the process's peak RSS on CPU,
max_memory_allocated on GPU. The bare loop also splits its time into data loading, forward, backward and
optimizer. Checkpoint bytes are those of the resumable checkpoint each vlfuse run writes at its end (slim:
frozen weights are fingerprinted, not saved).

Targets, printed as ratios at the end: retrieval frozen + cache >= 30x end-to-end samples/s (issue 14);
grounding frozen + cache, vlfuse's loop >= 0.95 of the bare loop; checkpoint bytes none <= 12% of all;
end-to-end and LoRA with the options on >= 1.3x off (issue 25).
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
RECIPE_DIR = {"grounding": "grounding", "retrieval": "retrieval"}


def _text_encoder_folder(preset: str, folder: Path) -> str:
    """The realistic preset's 6-layer, 384-wide BERT config with the bundled tokenizer (random weights)."""
    if preset == "default":
        return "vlfuse:tiny-bert"
    from transformers import BertConfig, BertTokenizer

    from vlfuse.encoders.text import resolve_text_encoder_name

    tokenizer = BertTokenizer.from_pretrained(resolve_text_encoder_name("vlfuse:tiny-bert"))
    BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=64,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _steps(args, cache: bool) -> int:
    return args.steps * (10 if cache else 1)


# What the "options" field of a run means: the speed options as they were before (off), the defaults.
OPTIONS = {
    "off": ["train.channels_last=false", "train.fused_optimizer=false", "train.compile=false"],
    "default": [],
}
# LoRA on both towers (the rest of the model trains in full).
MODES = {
    "all": ["model.trainable_encoders=all"],
    "none": ["model.trainable_encoders=none"],
    "lora": [
        "model.trainable_encoders=all",
        "model.image_encoder.tuning=lora",
        "model.text_encoder.tuning=lora",
    ],
}


def _config(args, task: str, mode: str, cache: bool, work: Path, options: str = "default"):
    from vlfuse.config import load_config

    on = ["train.compile=true"] if args.compile else []
    overrides = [
        *MODES[mode],
        *(OPTIONS[options] if options in OPTIONS else on),
        f"train.cache_features={str(cache).lower()}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.warmup + _steps(args, cache)}",
        f"train.log_every={args.warmup}",
        "train.eval_every=1000000",
        "train.checkpoint_every=1000000",
        f"train.output_dir={work / 'run'}",
        f"train.cache_dir={work / 'cache'}",
        f"data.shapes_train_size={args.train_images}",
        "data.shapes_eval_size=8",
        "data.max_eval_samples=8",
    ]
    if args.preset == "default":
        return load_config(ROOT / f"recipes/configs/{RECIPE_DIR[task]}/shapes.yaml", overrides)
    # The realistic pair starts from the schema's defaults, not shapes.yaml (whose tiny CNN runs at
    # output_stride 8): the default fusion head (transformer) and training settings.
    overrides += [
        "data.dataset=shapes",
        "model.image_encoder.name=resnet50",
        "model.image_encoder.pretrained=false",
        "model.image_encoder.image_size=224",
        f"model.text_encoder.name={_text_encoder_folder('realistic', work / 'bert')}",
        "model.text_encoder.pretrained=false",
        "model.text_encoder.max_length=16",
    ]
    if task == "retrieval":
        overrides += [
            "model.task=retrieval",
            "model.fusion.name=projection",
            "data.columns={image: image, text: captions}",
        ]
    else:
        overrides.append("model.fusion.name=transformer")
    return load_config(None, overrides)


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_sample(cfg, task_name: str, cache: bool) -> float:
    """The FLOPs of one training step of ``cfg``'s model (forward and backward; frozen towers forward
    only, cached ones not at all), per sample."""
    import torch

    from vlfuse.model import VLFuseModel
    from vlfuse.tasks import get_task
    from vlfuse.training.speed import count_flops

    torch.manual_seed(cfg.train.seed)
    task = get_task(task_name)
    model = VLFuseModel(cfg.model).train()
    dataset = task.build_dataset(cfg, model, "train", train=True)
    if cache:  # reads the cache the run built
        from accelerate import Accelerator

        from vlfuse.data.feature_cache import cached_dataset

        dataset = cached_dataset(
            model, dataset, "train", cfg.train.cache_dir, cfg.train.cache_dtype, 64, Accelerator()
        )
    n = cfg.train.batch_size
    batch = task.collator(model, train=True)([dataset[i] for i in range(n)])
    batch.pop("bad_rows")
    return count_flops(lambda: task.loss(model(**batch), batch)[0].backward()) / n


def run_vlfuse(args, task: str, mode: str, cache: bool, work: Path, options: str = "default") -> dict:
    from vlfuse.checkpointing import list_checkpoints
    from vlfuse.training import train

    cfg = _config(args, task, mode, cache, work, options)
    caching_s = 0.0
    if cache:  # build the cache first, timed on its own; train() then reuses it
        import torch
        from accelerate import Accelerator

        from vlfuse.data.feature_cache import cached_dataset
        from vlfuse.model import VLFuseModel
        from vlfuse.tasks import get_task

        torch.manual_seed(cfg.train.seed)
        model = VLFuseModel(cfg.model)
        dataset = get_task(task).build_dataset(cfg, model, "train", train=True)
        t0 = time.perf_counter()
        cached_dataset(model, dataset, "train", cfg.train.cache_dir, cfg.train.cache_dtype, 64, Accelerator())
        caching_s = time.perf_counter() - t0
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    train(cfg)
    summary = json.loads((Path(cfg.train.output_dir) / "summary.json").read_text())
    checkpoint = list_checkpoints(Path(cfg.train.output_dir) / "checkpoints")[-1]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "peak_mb": _peak_mb(),
        "caching_s": caching_s,
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file()),
        "flops_per_sample": flops_per_sample(cfg, task, cache),
    }


def run_bare(args, task_name: str, mode: str, cache: bool, work: Path, options: str = "default") -> dict:
    """The same model, data and optimizer in a plain loop: the floor for vlfuse's loop."""
    import torch
    from torch.utils.data import DataLoader

    from vlfuse.model import VLFuseModel
    from vlfuse.tasks import get_task

    cfg = _config(args, task_name, mode, cache, work, options)
    steps = _steps(args, cache)
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(task_name)
    model = VLFuseModel(cfg.model)
    dataset = task.build_dataset(cfg, model, "train", train=True)
    if cache:
        from accelerate import Accelerator

        from vlfuse.data.feature_cache import cached_dataset

        dataset = cached_dataset(
            model, dataset, "train", cfg.train.cache_dir, cfg.train.cache_dtype, 64, Accelerator()
        )
    model.place(device, keep_on_cpu=["image", "text"] if cache else []).train()  # as vlfuse's loop does
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=task.collator(model, train=True),
    )
    # The same speed options as vlfuse's loop (channels-last convolutions, the optimizer's kernel).
    from vlfuse.training.speed import optimizer_options, use_channels_last

    if cfg.train.channels_last:
        use_channels_last(model)
    groups = model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, **optimizer_options(params, cfg.train.fused_optimizer))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    done, samples, start = 0, 0, None
    iterator = iter(loader)
    while done < args.warmup + steps:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        batch.pop("bad_rows")
        batch = {k: v.to(device) for k, v in batch.items()}
        sync()
        t1 = time.perf_counter()
        loss, _ = task.loss(model(**batch), batch)
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        done += 1
        if done == args.warmup:
            start = time.perf_counter()
        elif done > args.warmup:
            samples += batch["valid"].shape[0]
            for name, (a, b) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
                phases[name] += b - a
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": samples / elapsed,
        "peak_mb": _peak_mb(),
        "phases_ms_per_step": {k: 1000 * v / steps for k, v in phases.items()},
    }


RUNS = {  # label -> (loop, trainable_encoders or lora, cache, speed options)
    "grounding": [
        ("end-to-end (all)", "vlfuse", "all", "live", "on"),
        ("frozen (none)", "vlfuse", "none", "live", "on"),
        ("frozen + cache", "vlfuse", "none", "cache", "on"),
        ("LoRA", "vlfuse", "lora", "live", "on"),
        ("all, options off", "vlfuse", "all", "live", "off"),
        ("LoRA, options off", "vlfuse", "lora", "live", "off"),
        ("bare all", "bare", "all", "live", "default"),
        ("bare none", "bare", "none", "live", "default"),
        ("bare none + cache", "bare", "none", "cache", "default"),
    ],
    "retrieval": [
        ("end-to-end (all)", "vlfuse", "all", "live", "on"),
        ("frozen + cache", "vlfuse", "none", "cache", "on"),
    ],
}


BARE_TWIN = {
    "bare all": "end-to-end (all)",
    "bare none": "frozen (none)",
    "bare none + cache": "frozen + cache",
}


def _measure(args, task: str, run: tuple[str, str, str, str], shared: Path) -> dict:
    loop, mode, cache, options = run
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{task}:{loop}:{mode}:{cache}:{options}",
        "--preset",
        args.preset,
    ]
    for flag in ("steps", "warmup", "batch_size", "train_images"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--compile"] if args.compile else []
    work = shared / (f"{task}-{loop}-cache" if cache == "cache" else f"{task}-{loop}-{mode}-{options}")
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "VLFUSE_BENCH_WORK": str(work)}
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit(f"{task} {run} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def _report_grounding(rows: dict) -> None:
    e2e = rows["end-to-end (all)"]
    print(
        "  frozen + cache / end-to-end samples/s: "
        f"{rows['frozen + cache']['samples_per_s'] / e2e['samples_per_s']:.2f}x"
    )
    print(
        "  frozen / end-to-end samples/s:         "
        f"{rows['frozen (none)']['samples_per_s'] / e2e['samples_per_s']:.2f}x"
    )
    print(
        f"  frozen / end-to-end peak memory:       {rows['frozen (none)']['peak_mb'] / e2e['peak_mb']:.2f}x"
    )
    for vl, bare in (
        ("end-to-end (all)", "bare all"),
        ("frozen (none)", "bare none"),
        ("frozen + cache", "bare none + cache"),
    ):
        print(f"  vlfuse / bare loop, {vl:<17} {rows[vl]['samples_per_s'] / rows[bare]['samples_per_s']:.3f}")
    none_mb, all_mb = (rows[k]["checkpoint_bytes"] / 2**20 for k in ("frozen (none)", "end-to-end (all)"))
    print(
        f"  checkpoint bytes none / all:           {none_mb / all_mb:.3f} ({none_mb:.1f} / {all_mb:.1f} MiB)"
    )
    for label, off in (("end-to-end (all)", "all, options off"), ("LoRA", "LoRA, options off")):
        gain = rows[label]["samples_per_s"] / rows[off]["samples_per_s"]
        print(f"  {label}, options on / off samples/s: {gain:.2f}x (target >= 1.3x)")
    print("  where a bare step's time goes (ms per step):")
    for bare in ("bare all", "bare none", "bare none + cache"):
        phases = rows[bare]["phases_ms_per_step"]
        print(f"    {bare:<18} " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))


def _report_retrieval(rows: dict) -> None:
    e2e, cached = rows["end-to-end (all)"], rows["frozen + cache"]
    print(f"  frozen + cache / end-to-end samples/s: {cached['samples_per_s'] / e2e['samples_per_s']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("realistic", "default"), default="realistic")
    parser.add_argument(
        "--tasks", default="grounding,retrieval", help="comma-separated: grounding, retrieval"
    )
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run (x10 for cached runs)")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=400, help="embedded train images (cache size)")
    parser.add_argument("--compile", action="store_true", help="options on include train.compile=true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.one:
        task, loop, mode, cache, options = args.one.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(os.environ.get("VLFUSE_BENCH_WORK", tmp))
            runner = run_vlfuse if loop == "vlfuse" else run_bare
            result = runner(args, task, mode, cache == "cache", work, options)
        print("RESULT " + json.dumps(result))
        return
    tasks = args.tasks.split(",")
    if unknown := [t for t in tasks if t not in RUNS]:
        sys.exit(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(RUNS)}")
    peaks = machine_peak()
    print("peak matmul: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    shared = Path(tempfile.mkdtemp(prefix="vlfuse-bench-"))  # the cache is shared by the runs that use it
    results = {}
    for task in tasks:
        rows = results[task] = {}
        for label, *run in RUNS[task]:
            print(f"running {task}: {label} ...", flush=True)
            rows[label] = _measure(args, task, tuple(run), shared)
    _print_results(args, results, peaks)


def machine_peak() -> dict[str, float]:
    """The matmul peak in float32 with the threads a run uses (and in bfloat16 on a GPU)."""
    import torch

    from vlfuse.training.speed import peak_matmul_flops

    if torch.cuda.is_available():
        device = torch.device("cuda")
        return {
            "float32": peak_matmul_flops(device, torch.float32, 8192),
            "bfloat16": peak_matmul_flops(device, torch.bfloat16, 8192),
        }
    torch.set_num_threads(os.cpu_count() or 1)  # what vlfuse's CPU runs use (train.cpu_threads)
    return {"float32": peak_matmul_flops(torch.device("cpu"), torch.float32, 2048)}


def _print_results(args, results: dict, peaks: dict[str, float]) -> None:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    steps = f"steps={args.steps} (+{args.warmup} warm-up)"
    peak = peaks["float32"]
    print(f"\npreset={args.preset} batch={args.batch_size} {steps} on {device}")
    print(f"fraction of peak: achieved FLOP/s over the float32 matmul peak ({peak / 1e9:.1f} GFLOP/s)")
    for task, rows in results.items():
        print(
            f"\n{task}\n{'run':<20} {'samples/s':>10} {'GFLOP/sample':>13} {'GFLOP/s':>8} {'of peak':>8} "
            f"{'peak MiB':>9} {'ckpt MiB':>9}"
        )
        for label, r in rows.items():
            twin = BARE_TWIN.get(label, label)  # the bare loop runs the same model
            flops = r.get("flops_per_sample") or rows.get(twin, {}).get("flops_per_sample") or float("nan")
            achieved = flops * r["samples_per_s"]
            ckpt = f"{r['checkpoint_bytes'] / 2**20:>9.1f}" if "checkpoint_bytes" in r else f"{'-':>9}"
            print(
                f"{label:<20} {r['samples_per_s']:>10.1f} {flops / 1e9:>13.2f} {achieved / 1e9:>8.1f} "
                f"{achieved / peak:>8.1%} {r['peak_mb']:>9.0f} {ckpt}"
            )
        print(f"one-off caching time: {rows['frozen + cache']['caching_s']:.1f} s; ratios:")
        {"grounding": _report_grounding, "retrieval": _report_retrieval}[task](rows)


if __name__ == "__main__":
    main()
