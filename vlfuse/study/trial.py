"""One study trial in processes of its own (``study.launch``): ``<launch> -m vlfuse.study.trial RUN.yaml``
trains the run config the study wrote, e.g. under ``accelerate launch`` on several processes or GPUs.

Exit status: 0 trained; 3 the run stopped on bad data or NaN losses (``TrainingError``: a result for the
study, its message in ``error.txt`` beside the config); anything else is a failure (the trial is queued
again the next time the study runs).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from vlfuse.config import load_config
from vlfuse.schema import Config, to_yaml
from vlfuse.training import TrainingError, train

TRAINING_STOPPED = 3


class LaunchError(RuntimeError):
    """A launched trial's processes failed (not a training result)."""


def launch(
    command: str, run_cfg: Config, run_dir: Path, timeout: int | None = None
) -> tuple[dict[str, Any], str | None]:
    """Runs ``run_cfg`` through ``command`` (e.g. ``accelerate launch --num_processes 2``); returns the last
    metrics per split and the error of a run that stopped on bad data or NaN losses.

    Args:
        timeout: seconds; past them the launched processes (the launcher's whole process group, its
            children included) are ended.

    Raises:
        LaunchError: the processes failed for another reason (the command and its exit status), or ran
            past ``timeout``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "trial.yaml"
    config.write_text(to_yaml(run_cfg))
    cmd = [*shlex.split(command), "-m", "vlfuse.study.trial", str(config)]
    process = subprocess.Popen(cmd, start_new_session=True)  # its own group: ended with its children
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(process)
        raise LaunchError(f"the trial ran past study.trial_timeout={timeout} s: {shlex.join(cmd)}") from None
    except BaseException:  # the worker is interrupted: its trial's processes do not outlive it
        end_group(process)
        raise
    if code == TRAINING_STOPPED:
        return {}, (run_dir / "error.txt").read_text()
    if code != 0:
        raise LaunchError(f"the trial's launch failed (exit status {code}): {shlex.join(cmd)}")
    return json.loads((run_dir / "summary.json").read_text())["metrics"], None


def end_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group of ``process``; SIGKILL to what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    try:
        train(load_config(path))
    except TrainingError as err:
        (path.parent / "error.txt").write_text(str(err))
        print(f"error: {err}", file=sys.stderr)
        return TRAINING_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
