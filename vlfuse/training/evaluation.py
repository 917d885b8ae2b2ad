"""Evaluation: metrics over a whole split on any number of processes, during training or of a saved
model (``recipes/evaluate.py``)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from vlfuse.schema import Config
from vlfuse.tasks import Task, get_task
from vlfuse.tracking import JsonlWriter
from vlfuse.training.data import build_eval_loaders
from vlfuse.training.setup import build_model, start_run


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, task: Task, loader: DataLoader) -> dict[str, float]:
    """Metrics over the whole split on any number of processes: per-example values are gathered (the
    duplicates added to even out the processes are dropped) before reduction (``Task.eval_loop``).
    Unusable rows are masked out (the task's ``valid`` value) and reported as ``bad_rows``."""
    was_training = model.training
    model.eval()
    values = task.eval_loop(accelerator, model, loader)
    model.train(was_training)
    metrics = task.metrics(values)
    # Counted from the gathered mask: a bad row that Accelerate repeats to even out the last batches is
    # dropped with the other repeats, so it counts once (a per-process count would count it twice).
    metrics["bad_rows"] = int((values["valid"] == 0).sum().item())
    return metrics


def evaluate_saved(cfg: Config) -> dict[str, dict[str, float]]:
    """Scores ``model.init_from`` (a ``final/`` folder or a Hub id) on each of ``data.eval_split``,
    printing the metrics and appending them to ``output_dir/metrics.jsonl``."""
    if not cfg.model.init_from:
        raise ValueError("evaluation needs model.init_from=<a saved model folder or Hub id>")
    model = build_model(cfg, check_task=False)
    cfg.model.task = model.config.task  # the saved model's task decides the data and metrics
    task = get_task(cfg.model.task)
    accelerator, output_dir = start_run(cfg, task)
    loaders = build_eval_loaders(accelerator, cfg, task, model)
    model = accelerator.prepare(model)
    writer = JsonlWriter(output_dir / "metrics.jsonl", accelerator)
    results = {}
    for split, loader in loaders.items():
        results[split] = evaluate(accelerator, model, task, accelerator.prepare(loader))
        record = {"step": None, "epoch": None, "split": split, "model": str(cfg.model.init_from)}
        writer.write({**record, "num_processes": accelerator.num_processes, **results[split]}, echo=True)
    return results
