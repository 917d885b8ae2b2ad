"""What a run tells: the trackers and the start-up plan, the bad-data policy, the summary, the final model
(saved, with its card, and pushed to the Hub when asked) and the metric lines the recipes print."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from vlfuse.checkpointing import CheckpointError
from vlfuse.data.loading import DataError
from vlfuse.hub import push_folder
from vlfuse.schema import Config, ConfigError, shown_dict
from vlfuse.tracking import PeakMemory, Progress, Throughput
from vlfuse.training.data import MapData
from vlfuse.training.setup import Run, TrainState, towers_served_by_cache

# Bad-data fraction is judged only once this many examples were seen (a few bad rows early on are noise).
MIN_EXAMPLES_FOR_BAD_FRACTION = 50


class TrainingError(RuntimeError):
    """Training cannot go on: too much bad data, or the loss keeps diverging."""


# Errors whose message is the whole story: recipes print them without a stack trace.
USER_ERRORS = (ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError)


def tracker_config(cfg: Config, per_part: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The run's hyperparameters for the trackers: the whole resolved config flattened to dotted keys
    (``model.image_encoder.name``, ...), and the trainable / frozen parameter count of each part
    (``parameters.image_encoder.trainable``, ...). Values are scalars (lists, dicts and None as text), which
    every tracker accepts."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", shown_dict(cfg))
    walk("parameters", per_part)
    return flat


def start_trackers_and_print_plan(run: Run) -> dict[str, Any]:
    """Starts the trackers (``train.log_with``) with the whole config and prints what will train, per
    tower; returns the parameter counts (total and per part)."""
    per_part = run.accelerator.unwrap_model(run.model).parameter_counts()
    n_train = sum(c["trainable"] for c in per_part.values())
    n_frozen = sum(c["frozen"] for c in per_part.values())
    model_cfg = run.cfg.model
    tuning = {"image_encoder": model_cfg.image_encoder.tuning, "text_encoder": model_cfg.text_encoder.tuning}
    parts = "; ".join(
        f"{part}{f' ({tuning[part]})' if part in tuning and c['trainable'] else ''}: "
        f"{c['trainable']:,} trainable, {c['frozen']:,} frozen"
        for part, c in per_part.items()
    )
    image, text = model_cfg.image_encoder, model_cfg.text_encoder
    run.accelerator.print(
        f"image encoder {image.name} (image_size {image.image_size}, kwargs {dict(image.kwargs)}); "
        f"text encoder {text.name} (max_length {text.max_length}); fusion {model_cfg.fusion.name}"
    )
    if run.cfg.train.log_with:
        run.accelerator.init_trackers(run.output_dir.name, config=tracker_config(run.cfg, per_part))
    run.accelerator.print(
        f"trainable_encoders={model_cfg.trainable_encoders}: {n_train:,} trainable, {n_frozen:,} frozen "
        f"parameters ({parts}); {run.data.describe()}, {run.total_steps} steps, "
        f"{run.accelerator.num_processes} process(es)"
    )
    return {"trainable": n_train, "frozen": n_frozen, "per_part": per_part}


def log_training_and_stop_on_bad_data(
    run: Run, state: TrainState, totals: dict[str, float], rate: float, progress: Progress
) -> None:
    """Counts the window's examples and bad rows (stopping on too much bad data) and logs loss, learning
    rate and samples/s."""
    counters = state.counters
    counters["seen"] += int(totals["examples"])
    counters["bad_rows"] += int(totals["bad_rows"])
    for name, n in zip(run.data.source_names, totals["bad_rows_by_source"], strict=True):
        counters[f"bad_rows[{name}]"] = counters.get(f"bad_rows[{name}]", 0) + int(n)
    if counters["seen"] >= MIN_EXAMPLES_FOR_BAD_FRACTION:
        fraction = counters["bad_rows"] / counters["seen"]
        limit = run.cfg.data.max_bad_fraction
        if fraction > limit:
            raise TrainingError(
                f"{counters['bad_rows']:,} of {counters['seen']:,} training examples ({fraction:.1%}) are "
                f"unusable ({run.task.bad_rows}), more than data.max_bad_fraction={limit}; "
                f"{run.task.data_hint}"
            )
    state.last_loss = totals["loss_sum"] / max(totals["finite_steps"], 1.0)
    lr = run.scheduler.get_last_lr()[0]
    progress.report(state.step, state.last_loss, lr, rate)
    run.train_log.write({"step": state.step, "loss": state.last_loss, "lr": lr, "samples_per_s": rate})
    if run.cfg.train.log_with:
        run.accelerator.log({"train/loss": state.last_loss, "train/lr": lr}, step=state.step)


def accelerator_weights_mib(model: torch.nn.Module, device: torch.device) -> float | None:
    """MiB of weights and buffers held in accelerator memory (None on a CPU run)."""
    if device.type == "cpu":
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type) / 2**20


def held_state_mib(model: torch.nn.Module, optimizer) -> float:
    """MiB of parameters and optimizer state this process holds (under FSDP its shards only)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard

    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors = [local(t) for t in [*model.parameters(), *states]]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def feature_cache_stats(run: Run) -> dict[str, dict[str, Any]]:
    """Each cache folder the run read (``train.cache_features``): its distinct entries, examples, bytes
    and build time, by folder name."""
    datasets = [run.data.dataset, *(loader.dataset for loader in run.eval_loaders.values())]
    found: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        for candidate in (dataset, getattr(dataset, "base", None)):  # retrieval's per-image view wraps it
            for stats in getattr(candidate, "cache_stats", {}).values():
                found[stats["folder"]] = {k: v for k, v in stats.items() if k != "folder"}
    return found


def build_summary(
    run: Run, state: TrainState, meter: Throughput, rate: float, memory: PeakMemory, counts: dict[str, Any]
) -> dict[str, Any]:
    """``summary.json``'s content: steps, throughput, memory per process, parameters, time split, bad data
    and the last metrics (a collective: every process calls it)."""
    cfg, accelerator = run.cfg, run.accelerator
    peak_mb = memory.stop_mb()
    # Every process's own figures (a collective): what sharding (FSDP) saves shows per process.
    mine = torch.tensor([peak_mb, held_state_mib(run.model, run.optimizer)], device=accelerator.device)
    peaks, held = accelerator.gather(mine[None]).T.tolist()
    summary = {
        "trainable_encoders": cfg.model.trainable_encoders,
        "steps": state.step,
        "samples": meter.samples,
        # the train split's rows and examples read (a part of it with data.holdout / data.train_subset);
        # a stream's are not known
        "train_rows": run.data.dataset.counts.get("rows") if isinstance(run.data, MapData) else None,
        "train_examples": len(run.data.dataset) if isinstance(run.data, MapData) else None,
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - run.wall_start,
        "train_samples_per_s": rate,
        "peak_memory_mb": peak_mb,
        "peak_memory_mb_per_process": [round(p, 1) for p in peaks],
        "weights_and_optimizer_mib_per_process": [round(h, 1) for h in held],
        "peak_memory_kind": memory.kind,
        "trainable_parameters": counts["trainable"],
        "frozen_parameters": counts["frozen"],
        "parameters": counts["per_part"],
        "tuning": {"image": cfg.model.image_encoder.tuning, "text": cfg.model.text_encoder.tuning},
        "towers_served_by_cache": towers_served_by_cache(cfg, accelerator),
        "feature_cache": feature_cache_stats(run),
        "accelerator_weights_mib": accelerator_weights_mib(run.model, accelerator.device),
        "last_loss": state.last_loss,
        "time_data_s": meter.data,
        "time_step_s": meter.step,
        "time_eval_s": meter.eval,
        **state.counters,
        "metrics": state.last_metrics,
    }
    return summary


def save_final_model_and_summary(
    run: Run, state: TrainState, meter: Throughput, summary: dict[str, Any]
) -> None:
    """Writes ``final/`` (the whole model and its card), pushes it when ``train.push_to_hub``, then
    ``summary.json``, and prints the run's last line (every process calls it: gathering a sharded model's
    state is a collective)."""
    cfg, accelerator = run.cfg, run.accelerator
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full_state = (
        accelerator.get_state_dict(run.model) if sharded else None
    )  # a collective: every rank calls it
    if accelerator.is_main_process:
        card = {"config": shown_dict(cfg), "summary": summary}
        final = accelerator.unwrap_model(run.model).save_pretrained(
            run.output_dir / "final", state_dict=full_state, run=card
        )
        if cfg.train.push_to_hub:
            push_final(cfg, final, accelerator.print)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.print(
        f"done: {state.step} steps, {meter.samples:,} samples, {summary['train_samples_per_s']:.1f} "
        "samples/s, peak memory "
        f"{summary['peak_memory_mb']:.0f} MiB ({summary['peak_memory_kind']}); time in data loading "
        f"{meter.data:.1f} s, forward+backward+optimizer {meter.step:.1f} s, evaluation {meter.eval:.1f} s; "
        f"{state.counters['bad_rows']} bad rows skipped{per_source_bad_rows(run, state)}, "
        f"{state.counters['skipped_steps']} steps skipped; "
        f"model in {run.output_dir / 'final'}"
    )


def per_source_bad_rows(run: Run, state: TrainState) -> str:
    """`` (refcoco 0, lmms 3)``: a mixed run's bad rows by source; nothing for one dataset."""
    counts = [f"{name} {state.counters.get(f'bad_rows[{name}]', 0)}" for name in run.data.source_names]
    return f" ({', '.join(counts)})" if counts else ""


def hub_model_id(cfg: Config) -> str:
    """``train.hub_model_id``, or the run folder's name."""
    return cfg.train.hub_model_id or Path(cfg.train.output_dir).resolve().name


def push_final(cfg: Config, final: Path, log: Callable[[str], None] = print, suffix: str = "") -> str:
    """Uploads ``final/`` to ``train.hub_model_id`` (+ ``suffix``); returns the commit URL."""
    repo_id = hub_model_id(cfg) + suffix
    log(f"pushing {final} to the Hub model repository {repo_id} ...")
    url = push_folder(
        final, repo_id, private=cfg.train.hub_private, commit_message=f"vlfuse: {final.parent.name}"
    )
    log(f"pushed: {url}")
    return url


def format_metrics(results: dict[str, dict[str, Any]]) -> str:
    """One line per split: ``validation: acc@0.5=0.9746, ...``."""
    return "\n".join(
        f"{split}: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        for split, values in results.items()
    )
