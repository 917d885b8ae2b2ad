"""Runs recipes/grounding.py's main; at the end every rank takes part in gathering the full weights and in
predicting boxes for fixed inputs with the sharded model, and rank 0 writes both to train.output_dir
(fsdp_state.safetensors, fsdp_boxes.safetensors) so a test can compare them with final/ on one process.
Every rank also writes how many of the parameters' elements it holds (sharding_rank<N>.json)."""

import json
import sys
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from grounding import main  # noqa: E402

from vlfuse.config import load_config, parse_cli  # noqa: E402

IMAGES = [Image.new("RGB", (90, 40), (200, 20, 20)), Image.new("RGB", (30, 70), (20, 200, 20))]
TEXTS = ["the red circle", "the lowest shape"]


def gather_and_predict(accelerator, model):
    _, overrides = parse_cli(sys.argv[1:])
    out = Path(load_config(None, overrides).train.output_dir)
    params = list(model.parameters())
    held = {
        "distributed_type": str(accelerator.distributed_type),
        "local": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
        "global": sum(p.numel() for p in params),
    }
    (out / f"sharding_rank{accelerator.process_index}.json").write_text(json.dumps(held))
    state = accelerator.get_state_dict(model)  # a collective: every rank calls it
    boxes = accelerator.unwrap_model(model).predict(IMAGES, TEXTS)  # sharded forward: every rank
    if accelerator.is_main_process:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "fsdp_state.safetensors")
        )
        save_file({"boxes": boxes.detach().cpu().contiguous()}, str(out / "fsdp_boxes.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:], on_end=gather_and_predict)
