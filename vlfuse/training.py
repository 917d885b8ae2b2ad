"""The one Accelerate training and evaluation loop that every recipe shares.

``train(cfg)`` builds the model, data, optimizer and scheduler, runs the loop with periodic evaluation and
checkpoints, and writes ``output_dir``:

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one JSON object per evaluation of a split;
- ``train_log.jsonl``: training loss, learning rate and throughput every ``train.log_every`` steps;
- ``checkpoints/step_<N>/``: resumable state (``accelerator.save_state`` + ``trainer_state.json``);
- ``final/``: the trained model (``VLFuseModel.save_pretrained``);
- ``summary.json``: steps, throughput, peak memory, time split, bad data and skipped steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vlfuse.config import Config, ConfigError, to_yaml
from vlfuse.data.loading import DataError
from vlfuse.model import VLFuseModel
from vlfuse.tasks import get_task

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
# Bad-data fraction is judged only once this many examples were seen (a few bad rows early on are noise).
MIN_EXAMPLES_FOR_BAD_FRACTION = 50


class TrainingError(RuntimeError):
    """Training cannot go on: too much bad data, or the loss keeps diverging."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or damaged; the message names the file."""


# Errors whose message is the whole story: recipes print them without a stack trace.
USER_ERRORS = (ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError)


# ------------------------------------------------------------------------------------------- checkpoints
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first. A save interrupted before publication leaves only a
    ``.tmp_*`` folder, which is ignored; so is a folder without ``trainer_state.json`` (written last)."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / TRAINER_STATE).is_file():
            try:
                found.append((int(path.name[len(CHECKPOINT_PREFIX) :]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Checks every file of a checkpoint against the SHA-256 recorded when it was saved.

    Returns:
        The checkpoint's trainer state.

    Raises:
        CheckpointError: naming the missing, truncated or corrupted file.
    """
    state_file = path / TRAINER_STATE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file} is missing or unreadable: {err}") from None
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file} is truncated or corrupted (its checksum does not match)")
    return state


def resolve_resume(
    resume_from: str | None, output_dir: Path, warn: Callable[[str], None] = print
) -> Path | None:
    """The checkpoint to resume from: a folder (verified), or ``latest``: the newest complete and intact
    checkpoint in ``output_dir/checkpoints``, falling back past damaged ones with a warning."""
    if resume_from is None:
        return None
    if resume_from != "latest":
        path = Path(resume_from).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume_from: no checkpoint folder {path}")
        verify_checkpoint(path)
        return path
    for path in reversed(list_checkpoints(output_dir / "checkpoints")):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            warn(f"warning: skipping checkpoint {path.name}: {err}")
    return None


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: dict[str, Any], keep_last: int
) -> Path:
    """Saves into a temporary folder, records each file's checksum, publishes the folder by rename, and
    only then prunes old checkpoints: a crash at any point leaves the previous checkpoint intact."""
    checkpoint_dir = output_dir / "checkpoints"
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state['step']}"
    tmp = checkpoint_dir / f".tmp_{CHECKPOINT_PREFIX}{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / TRAINER_STATE).write_text(json.dumps({**state, "files": files}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(accelerator: Accelerator, model, task, loader: DataLoader) -> dict[str, float]:
    """Metrics over the whole split on any number of processes: per-example values are gathered (the
    duplicates added to even out the processes are dropped) before reduction. Unusable rows are masked
    out and reported as ``bad_rows``."""
    was_training = model.training
    model.eval()
    values: dict[str, list[torch.Tensor]] = defaultdict(list)
    bad = torch.zeros((), device=accelerator.device)
    for batch in loader:
        bad += batch.pop("bad_rows")
        outputs = model(**batch)
        gathered = accelerator.gather_for_metrics(task.eval_values(outputs, batch))
        for k, v in gathered.items():
            values[k].append(v.detach().float().cpu())
    model.train(was_training)
    metrics = task.metrics({k: torch.cat(v) for k, v in values.items()})
    metrics["bad_rows"] = int(accelerator.reduce(bad, "sum").item())
    return metrics


def eval_splits(cfg: Config) -> list[str]:
    """``data.eval_split`` as a list."""
    split = cfg.data.eval_split
    return list(split) if isinstance(split, list | tuple) else [split]


class JsonlWriter:
    """Appends JSON lines to a file on the main process."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, record: dict[str, Any], echo: bool = False) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            tqdm.write(f"eval {shown}")


# ----------------------------------------------------------------------------------------------- setup
def build_accelerator(cfg: Config) -> Accelerator:
    output_dir = Path(cfg.train.output_dir)
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=cfg.train.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # Epoch-seeded shuffling: the data order is a function of (seed, epoch), so a resumed run can
        # replay it exactly and skip what it already saw.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def set_cpu_threads(accelerator: Accelerator, threads: int | None) -> None:
    """Uses the machine's cores on a CPU run: ``threads``, or cores / processes on this machine."""
    if accelerator.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(local, 1)))


def _start_run(cfg: Config, task) -> tuple[Accelerator, Path]:
    """The accelerator (CPU threads set) and the output folder, with the resolved ``config.yaml`` in it
    (after the task's ``prepare``, which may fill in settings from the data, such as the answer
    vocabulary)."""
    accelerator = build_accelerator(cfg)
    set_cpu_threads(accelerator, cfg.train.cpu_threads)
    if hasattr(task, "prepare"):
        task.prepare(cfg, accelerator)
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
    return accelerator, output_dir


def format_metrics(results: dict[str, dict[str, Any]]) -> str:
    """One line per split: ``validation: acc@0.5=0.9746, ...``."""
    return "\n".join(
        f"{split}: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        for split, values in results.items()
    )


def build_model(cfg: Config, check_task: bool = True) -> VLFuseModel:
    """The model of ``cfg.model``: built from the encoders, or loaded from ``model.init_from`` (whose
    task must be ``model.task`` when ``check_task``)."""
    if cfg.model.init_from:
        model = VLFuseModel.from_pretrained(cfg.model.init_from)
        if check_task and model.config.task != cfg.model.task:
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} is a {model.config.task!r} model, but "
                f"model.task={cfg.model.task!r}; use that task's recipe and config"
            )
        model.set_trainable_encoders(cfg.model.trainable_encoders)
        return model
    return VLFuseModel(cfg.model)


def _loader(dataset, cfg: Config, collate, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        drop_last=shuffle,
        # Not persistent: workers get a fresh copy of the dataset, with its epoch, every epoch.
        persistent_workers=False,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed run
        # (which starts one more iterator) would see different dropout masks than a straight one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def _maybe_cached(accelerator, cfg: Config, model, dataset, split: str):
    """With ``train.cache_features``, the dataset reading its frozen towers' features from the cache."""
    if not cfg.train.cache_features:
        return dataset
    from vlfuse.data.feature_cache import cached_dataset

    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    return cached_dataset(
        model, dataset, split, cfg.train.cache_dir, cfg.train.cache_dtype, batch_size, accelerator
    )


def _build_eval_loaders(accelerator, cfg, task, model) -> dict[str, DataLoader]:
    loaders = {}
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    for split in eval_splits(cfg):
        with accelerator.main_process_first():
            dataset = task.build_dataset(cfg, model, split, train=False)
        dataset = _maybe_cached(accelerator, cfg, model, dataset, split)
        accelerator.print(f"eval split {split}: {dataset.describe()}")
        loaders[split] = _loader(dataset, cfg, task.collator(model, train=False), batch_size, shuffle=False)
    return loaders


class PeakMemory:
    """Peak memory of one run: ``max_memory_allocated`` on a GPU (reset at the start), or on the CPU the
    highest resident set size sampled every 50 ms by a thread (the process-lifetime peak, ru_maxrss, would
    carry over from an earlier run in the same process, as in recipes/compare.py)."""

    def __init__(self, device: torch.device) -> None:
        import threading

        import psutil

        self.device, self.peak = device, 0
        self._stop = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        process = psutil.Process()

        def sample() -> None:
            while True:
                self.peak = max(self.peak, process.memory_info().rss)
                if self._stop.wait(0.05):
                    break

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_peak"

    def stop_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


DIVERGENCE_HINT = (
    "likely causes: a learning rate too high (train.lr / train.encoder_lr), fp16 overflow "
    "(try train.mixed_precision=bf16 or no), no gradient clipping (train.max_grad_norm), or bad boxes "
    "(check data.box_format and data.box_normalized)"
)


# ------------------------------------------------------------------------------------------------ train
def train(
    cfg: Config, on_end: Callable[[Accelerator, torch.nn.Module], None] | None = None
) -> dict[str, dict]:
    """Trains ``cfg.model`` on ``cfg.data`` as ``cfg.train`` says; returns the last metrics per split.

    Args:
        cfg: the whole config.
        on_end: called on every process with the accelerator and the prepared model after training
            (for inspection in tests and notebooks).

    Raises:
        TrainingError: more than ``data.max_bad_fraction`` of the examples are unusable, or
            ``train.max_bad_steps`` optimizer steps in a row had a NaN/inf loss or gradient.
    """
    wall_start = time.perf_counter()
    task = get_task(cfg.model.task)
    accelerator, output_dir = _start_run(cfg, task)
    memory = PeakMemory(accelerator.device)
    set_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.train.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    with accelerator.main_process_first():
        train_set = task.build_dataset(cfg, model, cfg.data.train_split, train=True)
    train_set = _maybe_cached(accelerator, cfg, model, train_set, cfg.data.train_split)
    accelerator.print(f"train split {cfg.data.train_split}: {train_set.describe()}")
    if len(train_set) < cfg.train.batch_size:
        raise ValueError(
            f"the train split has {len(train_set)} examples, "
            f"fewer than train.batch_size={cfg.train.batch_size}"
        )
    train_loader = _loader(
        train_set, cfg, task.collator(model, train=True), cfg.train.batch_size, shuffle=True
    )
    eval_loaders = _build_eval_loaders(accelerator, cfg, task, model)

    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay)
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_loader) // accum)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    # Stepped by hand once per optimizer step, so its length is in optimizer steps on any process count;
    # its state travels as JSON in trainer_state.json (no pickle to load back).
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)
    if cfg.train.log_with:
        accelerator.init_trackers(output_dir.name, config={"lr": cfg.train.lr})

    step = 0
    counters = {"seen": 0, "bad_rows": 0, "skipped_steps": 0}
    resume = resolve_resume(cfg.train.resume_from, output_dir, accelerator.print)
    if resume is not None:
        accelerator.load_state(str(resume))
        saved = json.loads((resume / TRAINER_STATE).read_text())
        scheduler.load_state_dict(saved["scheduler"])
        step = int(saved["step"])
        counters.update(saved.get("counters", {}))
        if (
            saved.get("num_processes") != accelerator.num_processes
            or saved.get("batch_size") != cfg.train.batch_size
        ):
            accelerator.print(
                f"warning: the data order changes: resuming with {accelerator.num_processes} process(es) x "
                f"batch {cfg.train.batch_size}, the checkpoint was saved with {saved.get('num_processes')} x "
                f"{saved.get('batch_size')}"
            )
        accelerator.print(f"resumed from {resume} at step {step}")
    elif cfg.train.resume_from == "latest":
        accelerator.print(
            f"resume_from=latest: no usable checkpoint in {output_dir / 'checkpoints'}, starting fresh"
        )

    metrics_log = JsonlWriter(output_dir / "metrics.jsonl", accelerator)
    train_log = JsonlWriter(output_dir / "train_log.jsonl", accelerator)
    last_metrics: dict[str, dict[str, float]] = {}

    def run_eval(epoch: int) -> None:
        t0 = time.perf_counter()
        for split, loader in eval_loaders.items():
            metrics = evaluate(accelerator, model, task, loader)
            last_metrics[split] = metrics
            record = {"step": step, "epoch": epoch, "split": split, **metrics}
            record["time_s"] = round(time.perf_counter() - wall_start, 3)  # since the run started
            record["train_bad_rows"] = counters["bad_rows"]
            record["skipped_steps"] = counters["skipped_steps"]
            metrics_log.write(record, echo=True)
            if cfg.train.log_with:
                accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)
        timings["eval"] += time.perf_counter() - t0

    def checkpoint(epoch: int) -> None:
        state = {
            "step": step,
            "epoch": epoch,
            "num_processes": accelerator.num_processes,
            "batch_size": cfg.train.batch_size,
            "scheduler": scheduler.state_dict(),
            "counters": counters,
        }
        save_checkpoint(accelerator, output_dir, state, cfg.train.keep_last)

    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(
        f"trainable_encoders={cfg.model.trainable_encoders}: {n_train:,} trainable, {n_frozen:,} frozen "
        f"parameters; {len(train_set):,} train examples, {total_steps} steps, "
        f"{accelerator.num_processes} process(es)"
    )
    progress = tqdm(
        total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train"
    )
    timings: dict[str, float] = defaultdict(float)
    samples, window_start, window_samples = 0, time.perf_counter(), 0
    # Steady-state throughput: from the end of the first logging window on, evaluation excluded.
    steady: dict[str, Any] = {"start": None, "samples": 0, "eval": 0.0}
    # Running sums since the last log, reduced across processes at log time: loss, finite micro-steps,
    # examples seen, bad rows.
    window = torch.zeros(4, device=accelerator.device)
    last_loss, consecutive_bad = float("nan"), 0
    max_norm = cfg.train.max_grad_norm or float("inf")
    fp16 = accelerator.mixed_precision == "fp16"
    model.train()
    epoch = step // steps_per_epoch
    while step < total_steps:
        train_loader.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * accum
        loader = accelerator.skip_first_batches(train_loader, skip) if skip > 0 else train_loader
        t_data = time.perf_counter()
        for batch in loader:
            t_step = time.perf_counter()
            timings["data"] += t_step - t_data
            n_bad = batch.pop("bad_rows")
            n_good = batch["valid"].shape[0]
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss, _ = task.loss(outputs, batch)
                accelerator.backward(loss)
                stepped = False
                loss_ok = torch.isfinite(loss.detach())
                if accelerator.sync_gradients:
                    # A NaN/inf loss on any rank makes the all-reduced gradient non-finite on every rank,
                    # so all ranks skip the same step without an extra collective.
                    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    if fp16:  # the loss scaler skips overflowing steps itself and lowers its scale
                        optimizer.step()
                        stepped = not accelerator.optimizer_step_was_skipped
                    elif torch.isfinite(norm):
                        optimizer.step()
                        stepped = True
                optimizer.zero_grad(set_to_none=True)
            window += torch.stack(
                [
                    torch.where(loss_ok, loss.detach().float(), 0.0),
                    loss_ok.float(),
                    n_bad + n_good,
                    n_bad.float(),
                ]
            )
            n = n_good * accelerator.num_processes
            samples += n
            window_samples += n
            timings["step"] += time.perf_counter() - t_step
            if accelerator.sync_gradients and not stepped:
                counters["skipped_steps"] += 1
                consecutive_bad += 1
                if consecutive_bad >= cfg.train.max_bad_steps and not (fp16 and bool(loss_ok)):
                    raise TrainingError(
                        f"{consecutive_bad} optimizer steps in a row had a NaN/inf loss or gradient "
                        f"(at step {step}); stopping. {DIVERGENCE_HINT}"
                    )
            elif accelerator.sync_gradients:
                consecutive_bad = 0
                scheduler.step()
                step += 1
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    totals = accelerator.reduce(window, "sum").tolist()
                    window.zero_()
                    counters["seen"] += int(totals[2])
                    counters["bad_rows"] += int(totals[3])
                    if counters["seen"] >= MIN_EXAMPLES_FOR_BAD_FRACTION:
                        fraction = counters["bad_rows"] / counters["seen"]
                        if fraction > cfg.data.max_bad_fraction:
                            raise TrainingError(
                                f"{counters['bad_rows']:,} of {counters['seen']:,} training examples "
                                f"({fraction:.1%}) are unusable (undecodable images, invalid boxes or no "
                                "answer), more "
                                f"than data.max_bad_fraction={cfg.data.max_bad_fraction}; "
                                "check data.columns, "
                                "data.box_format, data.box_normalized and data.image_root"
                            )
                    last_loss = totals[0] / max(totals[1], 1.0)
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_start, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
                    train_log.write({"step": step, "loss": last_loss, "lr": lr, "samples_per_s": rate})
                    if cfg.train.log_with:
                        accelerator.log({"train/loss": last_loss, "train/lr": lr}, step=step)
                    if steady["start"] is None:
                        steady.update(start=now, samples=samples, eval=timings["eval"])
                    window_start, window_samples = now, 0
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    run_eval(epoch)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    checkpoint(epoch)
                if step >= total_steps:
                    break
            t_data = time.perf_counter()
        if not cfg.train.eval_every:
            run_eval(epoch)
        epoch += 1
    progress.close()
    # Throughput covers the training loop only: not the final evaluation, checkpoint and model save below.
    loop_end, eval_in_loop = time.perf_counter(), timings["eval"]
    if cfg.train.eval_every and step % cfg.train.eval_every != 0:
        run_eval(epoch)
    if not cfg.train.checkpoint_every or step % cfg.train.checkpoint_every != 0:
        checkpoint(epoch)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full_state = accelerator.get_state_dict(model) if sharded else None  # a collective: every rank calls it
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir / "final", state_dict=full_state)
    accelerator.wait_for_everyone()
    if steady["start"] is not None and samples > steady["samples"]:
        steady_time = loop_end - steady["start"] - (eval_in_loop - steady["eval"])
        rate = (samples - steady["samples"]) / max(steady_time, 1e-9)
    else:  # too short a run for a steady window: everything but evaluation
        rate = samples / max(timings["data"] + timings["step"], 1e-9)
    summary = {
        "trainable_encoders": cfg.model.trainable_encoders,
        "steps": step,
        "samples": samples,
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_samples_per_s": rate,
        "peak_memory_mb": memory.stop_mb(),
        "peak_memory_kind": memory.kind,
        "trainable_parameters": n_train,
        "frozen_parameters": n_frozen,
        "last_loss": last_loss,
        "time_data_s": timings["data"],
        "time_step_s": timings["step"],
        "time_eval_s": timings["eval"],
        **counters,
        "metrics": last_metrics,
    }
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.print(
        f"done: {step} steps, {samples:,} samples, {rate:.1f} samples/s, peak memory "
        f"{summary['peak_memory_mb']:.0f} MiB ({summary['peak_memory_kind']}); time in data loading "
        f"{timings['data']:.1f} s, forward+backward+optimizer {timings['step']:.1f} s, evaluation "
        f"{timings['eval']:.1f} s; {counters['bad_rows']} bad rows skipped, {counters['skipped_steps']} "
        f"steps skipped; model in {output_dir / 'final'}"
    )
    if on_end is not None:
        on_end(accelerator, model)
    accelerator.end_training()
    return last_metrics


def evaluate_saved(cfg: Config) -> dict[str, dict[str, float]]:
    """Scores ``model.init_from`` (a ``final/`` folder or a Hub id) on each of ``data.eval_split``,
    printing the metrics and appending them to ``output_dir/metrics.jsonl``."""
    if not cfg.model.init_from:
        raise ValueError("evaluation needs model.init_from=<a saved model folder or Hub id>")
    model = build_model(cfg, check_task=False)
    cfg.model.task = model.config.task  # the saved model's task decides the data and metrics
    task = get_task(cfg.model.task)
    accelerator, output_dir = _start_run(cfg, task)
    loaders = _build_eval_loaders(accelerator, cfg, task, model)
    model = accelerator.prepare(model)
    writer = JsonlWriter(output_dir / "metrics.jsonl", accelerator)
    results = {}
    for split, loader in loaders.items():
        results[split] = evaluate(accelerator, model, task, accelerator.prepare(loader))
        record = {"step": None, "epoch": None, "split": split, "model": str(cfg.model.init_from)}
        writer.write({**record, "num_processes": accelerator.num_processes, **results[split]}, echo=True)
    return results


__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "TrainingError",
    "evaluate",
    "evaluate_saved",
    "format_metrics",
    "list_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "train",
    "verify_checkpoint",
]
