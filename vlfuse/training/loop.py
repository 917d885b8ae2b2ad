"""The one training loop every recipe shares: ``train(cfg)``, read top to bottom.

Set-up (``setup.set_up_run``: accelerator, model, data, optimizer, scheduler, ``prepare``), resume, the
epoch/step loop with periodic logging, evaluation and checkpoints, then the final evaluation, checkpoint,
model and summary (``report``). The task (``vlfuse.tasks``) supplies the data, loss and metrics. A run
writes ``output_dir``:

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one JSON object per evaluation of a split;
- ``train_log.jsonl``: training loss, learning rate and throughput every ``train.log_every`` steps;
- ``checkpoints/step_<N>/``: resumable state (``accelerator.save_state`` + ``trainer_state.json``);
- ``final/``: the trained model (``VLFuseModel.save_pretrained``);
- ``summary.json``: steps, throughput, peak memory, time split, bad data and skipped steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from vlfuse.checkpointing import restore_checkpoint, save_checkpoint
from vlfuse.distributed import broadcast_training_buffers
from vlfuse.schema import Config
from vlfuse.tasks import Task
from vlfuse.tracking import LossWindow, Progress, Throughput
from vlfuse.training.evaluation import evaluate
from vlfuse.training.grad_cache import cached_backward
from vlfuse.training.report import (
    TrainingError,
    build_summary,
    log_training_and_stop_on_bad_data,
    save_final_model_and_summary,
    start_trackers_and_print_plan,
)
from vlfuse.training.setup import Run, TrainState, set_up_run


@dataclass
class StepOutcome:
    """One micro-step: its loss, whether it was finite, and whether the optimizer stepped."""

    loss: torch.Tensor
    loss_ok: torch.Tensor
    stepped: bool
    examples: int
    bad_rows: torch.Tensor
    bad_rows_by_source: torch.Tensor | None = None


def train(
    cfg: Config,
    on_end: Callable[[Accelerator, torch.nn.Module], None] | None = None,
    on_eval: Callable[[int, dict[str, dict[str, float]]], bool] | None = None,
) -> dict[str, dict]:
    """Trains ``cfg.model`` on ``cfg.data`` as ``cfg.train`` says; returns the last metrics per split.

    Args:
        cfg: the whole config.
        on_end: called on every process with the accelerator and the prepared model after training
            (for inspection in tests and notebooks).
        on_eval: called on every process after each evaluation during training with the step and the
            metrics per split (the same on every process); returning True stops training there (early
            stopping, a study's pruner), after which the run ends as usual (evaluation, ``final/``).

    Raises:
        TrainingError: more than ``data.max_bad_fraction`` of the examples are unusable, or
            ``train.max_bad_steps`` optimizer steps in a row had a NaN/inf loss or gradient.
    """
    run = set_up_run(cfg)
    run.on_eval = on_eval
    state = restore_or_start_state(run)
    counts = start_trackers_and_print_plan(run)
    meter, window = Throughput(), LossWindow(run.accelerator.device, len(run.data.source_names))
    progress = Progress(run.total_steps, state.step, enabled=run.accelerator.is_local_main_process)
    run.model.train()
    run.data.start(state)
    while state.step < run.total_steps and not state.stop_requested:
        for batch in meter.batches(run.data.epoch_batches(state)):
            outcome = train_step(run, batch, meter)
            window.add(
                outcome.loss, outcome.loss_ok, outcome.examples, outcome.bad_rows, outcome.bad_rows_by_source
            )
            meter.add_samples(outcome.examples * run.accelerator.num_processes)
            if not run.accelerator.sync_gradients:
                continue
            if not outcome.stepped:
                count_skipped_step(run, state, outcome)
                continue
            state.consecutive_bad = 0
            run.scheduler.step()
            state.step += 1
            progress.update(1)
            log_evaluate_and_checkpoint_when_due(run, state, meter, window, progress)
            if state.step >= run.total_steps or state.stop_requested:
                break
        # A stream evaluates by steps only (and at the end): processes end their passes at different steps.
        if not cfg.train.eval_every and not cfg.data.streaming and not state.stop_requested:
            evaluate_during_training(run, state, meter)
        run.data.end_epoch(state)
    progress.close()
    # Throughput covers the training loop only: not the final evaluation, checkpoint and model save below.
    rate = meter.steady_rate(time.perf_counter(), meter.eval)
    evaluate_checkpoint_and_save_final(run, state, meter, rate, counts)
    if on_end is not None:
        on_end(run.accelerator, run.model)
    run.accelerator.end_training()
    return state.last_metrics


def log_evaluate_and_checkpoint_when_due(
    run: Run, state: TrainState, meter: Throughput, window: LossWindow, progress: Progress
) -> None:
    """After an optimizer step: the training log every ``train.log_every`` steps (and the last), an
    evaluation every ``train.eval_every``, a checkpoint every ``train.checkpoint_every``."""
    cfg = run.cfg.train
    if state.step % cfg.log_every == 0 or state.step == run.total_steps:
        rate = meter.window_rate()
        log_training_and_stop_on_bad_data(run, state, window.reduce(run.accelerator), rate, progress)
    if cfg.eval_every and state.step % cfg.eval_every == 0:
        evaluate_during_training(run, state, meter)
    if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
        checkpoint(run, state)


def restore_or_start_state(run: Run) -> TrainState:
    """The loop's state: fresh, or restored from ``train.resume_from`` (with the prepared objects)."""
    state = TrainState()
    saved = restore_checkpoint(run.accelerator, run.cfg.train, run.output_dir, run.frozen)
    if saved is not None:
        run.data.load(Path(saved["path"]))
        run.scheduler.load_state_dict(saved["scheduler"])
        state.step = int(saved["step"])
        state.counters.update(saved.get("counters", {}))
    return state


def train_step(run: Run, batch: dict[str, torch.Tensor], meter: Throughput) -> StepOutcome:
    """Forward, backward and (on the last micro-step of an accumulation) gradient clipping and the
    optimizer step, unless the gradient is not finite."""
    start = time.perf_counter()
    accelerator, model = run.accelerator, run.model
    share_buffers(run)
    n_bad = batch.pop("bad_rows")
    by_source = batch.pop("bad_rows_by_source", None)  # a mixed run's bad rows per source
    n_good = batch["valid"].shape[0]
    chunk = run.cfg.train.contrastive_chunk_size
    with accelerator.accumulate(model):
        if chunk and chunk < n_good:  # gradient caching: the whole batch's loss, a chunk's activations
            loss = cached_backward(accelerator, model, run.task.loss, batch, chunk)
        else:
            outputs = model(**batch)
            loss, _ = run.task.loss(outputs, batch)
            accelerator.backward(loss)
        stepped = False
        loss_ok = torch.isfinite(loss.detach())
        if accelerator.sync_gradients:
            # A NaN/inf loss on any rank makes the all-reduced gradient non-finite on every rank, so all
            # ranks skip the same step without an extra collective.
            norm = accelerator.clip_grad_norm_(
                model.parameters(), run.cfg.train.max_grad_norm or float("inf")
            )
            if accelerator.mixed_precision == "fp16":  # the loss scaler skips overflowing steps itself
                run.optimizer.step()
                stepped = not accelerator.optimizer_step_was_skipped
            elif torch.isfinite(norm):
                run.optimizer.step()
                stepped = True
        run.optimizer.zero_grad(set_to_none=True)
    meter.step += time.perf_counter() - start
    return StepOutcome(loss.detach(), loss_ok, stepped, n_good, n_bad, by_source)


def divergence_hint(task: Task) -> str:
    return (
        "likely causes: a learning rate too high (train.lr / train.encoder_lr), fp16 overflow "
        "(try train.mixed_precision=bf16 or no), no gradient clipping (train.max_grad_norm), or bad labels "
        f"({task.data_hint})"
    )


def count_skipped_step(run: Run, state: TrainState, outcome: StepOutcome) -> None:
    """Counts an optimizer step skipped for a NaN/inf loss or gradient; too many in a row stop the run."""
    state.counters["skipped_steps"] += 1
    state.consecutive_bad += 1
    fp16_overflow = run.accelerator.mixed_precision == "fp16" and bool(outcome.loss_ok)
    if state.consecutive_bad >= run.cfg.train.max_bad_steps and not fp16_overflow:
        raise TrainingError(
            f"{state.consecutive_bad} optimizer steps in a row had a NaN/inf loss or gradient "
            f"(at step {state.step}); stopping. {divergence_hint(run.task)}"
        )


def share_buffers(run: Run) -> None:
    """Under FSDP, process 0's BatchNorm statistics to every process (``broadcast_training_buffers``):
    before each forward, each checkpoint and each evaluation (else each process would evaluate its part
    of the data with the statistics of its own last batches, and not the model that is saved)."""
    if run.accelerator.distributed_type == DistributedType.FSDP:
        broadcast_training_buffers(run.model)


def evaluate_during_training(run: Run, state: TrainState, meter: Throughput) -> None:
    """Evaluates every eval split, appends the records to ``metrics.jsonl`` and the tracker."""
    start = time.perf_counter()
    share_buffers(run)  # while the modules are still in training mode (what it broadcasts)
    for split, loader in run.eval_loaders.items():
        metrics = evaluate(run.accelerator, run.model, run.task, loader)
        state.last_metrics[split] = metrics
        record = {"step": state.step, "epoch": state.epoch, "split": split, **metrics}
        record["time_s"] = round(time.perf_counter() - run.wall_start, 3)  # since the run started
        record["train_bad_rows"] = state.counters["bad_rows"]
        record["skipped_steps"] = state.counters["skipped_steps"]
        run.metrics_log.write(record, echo=True)
        if run.cfg.train.log_with:
            run.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=state.step)
    meter.eval += time.perf_counter() - start
    if run.on_eval is not None and run.on_eval(state.step, state.last_metrics):
        state.stop_requested = True
        run.accelerator.print(f"stopped at step {state.step}: asked by on_eval after its evaluation")


def checkpoint(run: Run, state: TrainState) -> None:
    share_buffers(run)  # one copy is saved: make it every process's
    trainer_state = {
        "step": state.step,
        "epoch": state.epoch,
        "num_processes": run.accelerator.num_processes,
        "batch_size": run.cfg.train.batch_size,
        "scheduler": run.scheduler.state_dict(),
        "counters": state.counters,
        "frozen_weights": run.frozen.record,
    }
    save_checkpoint(
        run.accelerator, run.output_dir, trainer_state, run.cfg.train.keep_last, per_process=run.data.save
    )


def evaluate_checkpoint_and_save_final(
    run: Run, state: TrainState, meter: Throughput, rate: float, counts: dict[str, Any]
) -> None:
    """The last evaluation and checkpoint (unless the loop just wrote them), ``final/`` and
    ``summary.json``."""
    cfg = run.cfg
    # Unless the loop just evaluated (every eval_every steps, or at the end of each epoch).
    if state.step % cfg.train.eval_every != 0 if cfg.train.eval_every else cfg.data.streaming:
        evaluate_during_training(run, state, meter)
    if not cfg.train.checkpoint_every or state.step % cfg.train.checkpoint_every != 0:
        checkpoint(run, state)
    summary = build_summary(run, state, meter, rate, run.memory, counts)
    save_final_model_and_summary(run, state, meter, summary)
