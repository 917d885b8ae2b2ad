"""Run on N CPU processes: retrieval evaluation of a tiny model (the same seed on every rank) over the
split in argv[1] (``data.dataset``), the rest of argv config overrides. Rank 0 writes to argv[2] the
gathered values, the metrics, and per rank the captions (token ids) its text tower ran on."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from ranks_io import write_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402

from vlfuse.distributed import use_fsdp_on_cpu_processes  # noqa: E402
from vlfuse.model import VLFuseModel  # noqa: E402
from vlfuse.tasks import get_task  # noqa: E402
from vlfuse.training.data import build_eval_loaders  # noqa: E402


def main(dataset: str, out: str, overrides: list[str]) -> None:
    accelerator = Accelerator(cpu=True)
    use_fsdp_on_cpu_processes(accelerator)  # an FSDP launch config shards (as the recipes do)
    cfg = tiny_config(f"data.dataset={dataset}", *overrides)
    torch.manual_seed(0)
    model = VLFuseModel(cfg.model)
    task = get_task(cfg.model.task)
    ran: list[list[int]] = []  # every caption (unpadded token ids) through this rank's text tower

    def count(_module, args):
        ids, mask = args
        ran.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))

    model.text_encoder.register_forward_pre_hook(count)
    (loader,) = build_eval_loaders(accelerator, cfg, task, model).values()
    model, loader = accelerator.prepare(model, loader)
    model.eval()
    with torch.no_grad():
        values = task.eval_loop(accelerator, model, loader)
    record = {"rank": accelerator.process_index, "ran": ran, "steps": len(loader)}
    if accelerator.is_main_process:
        record["values"] = {k: v.tolist() for k, v in values.items()}
        record["metrics"] = task.metrics(values)
    write_records(accelerator, record, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
