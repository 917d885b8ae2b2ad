"""What the multi-process test scripts share: every rank's record gathered and written by rank 0."""

import json

import torch.distributed as dist


def write_records(accelerator, record: dict, out: str) -> None:
    """Gathers ``record`` from every rank; the main process writes the list to ``out`` as JSON; then an
    orderly exit (gloo's threads stopped before the interpreter's)."""
    records = [None] * accelerator.num_processes
    dist.all_gather_object(records, record)
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(records, f)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()
