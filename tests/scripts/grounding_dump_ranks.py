"""Runs recipes/grounding.py's main, then every rank writes its own copy of the weights
(rank<N>.safetensors in train.output_dir) so a test can compare the ranks."""

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from grounding import main  # noqa: E402

from vlfuse.config import load_config, parse_cli  # noqa: E402


def dump(accelerator, model):
    _, overrides = parse_cli(sys.argv[1:])
    out = Path(load_config(None, overrides).train.output_dir)
    state = accelerator.unwrap_model(model).state_dict()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(out / f"rank{accelerator.process_index}.safetensors"),
    )


if __name__ == "__main__":
    main(sys.argv[1:], on_end=dump)
