"""Trains with checkpoints every 2 steps and kills itself with SIGKILL in the middle of writing the
second checkpoint (after part of the weights file is on disk, before it is published)."""

import os
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

from vlfuse.config import load_config, parse_cli
from vlfuse.training import train

calls = {"n": 0}
original = Accelerator.save_state


def save_state_then_die(self, output_dir=None, **kwargs):
    calls["n"] += 1
    result = original(self, output_dir, **kwargs)
    if calls["n"] == 2:
        weights = Path(output_dir) / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])  # a write cut off halfway
        os.kill(os.getpid(), signal.SIGKILL)
    return result


Accelerator.save_state = save_state_then_die

if __name__ == "__main__":
    path, overrides = parse_cli(sys.argv[1:])
    train(load_config(path, overrides))
