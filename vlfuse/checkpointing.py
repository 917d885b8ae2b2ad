"""Resumable checkpoints: publish, verify, prune, resume.

A checkpoint is ``output_dir/checkpoints/step_<N>/``: Accelerate's state (model, optimizer, RNG states,
data position) plus ``trainer_state.json`` (step, scheduler state as JSON, counters and every file's
SHA-256). It is written to ``.tmp_step_<N>`` and published by rename, and old checkpoints are pruned only
after that, so a crash at any point leaves the previous checkpoint intact. Resuming verifies every file
against its checksum; ``latest`` falls back past damaged checkpoints with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from vlfuse.schema import TrainConfig

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or damaged; the message names the file."""


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
    only then prunes old checkpoints: a crash at any point leaves the previous checkpoint intact.

    Args:
        state: the loop's own state (``step`` at least), written to ``trainer_state.json``.
    """
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


def restore_checkpoint(accelerator: Accelerator, cfg: TrainConfig, output_dir: Path) -> dict[str, Any] | None:
    """Loads ``train.resume_from`` into the prepared objects (model, optimizer, RNG, data position).

    Returns:
        The checkpoint's trainer state (step, scheduler, counters), or None when starting fresh.
    """
    resume = resolve_resume(cfg.resume_from, output_dir, accelerator.print)
    if resume is None:
        if cfg.resume_from == "latest":
            accelerator.print(
                f"resume_from=latest: no usable checkpoint in {output_dir / 'checkpoints'}, starting fresh"
            )
        return None
    accelerator.load_state(str(resume))
    saved = json.loads((resume / TRAINER_STATE).read_text())
    if saved.get("num_processes") != accelerator.num_processes or saved.get("batch_size") != cfg.batch_size:
        accelerator.print(
            f"warning: the data order changes: resuming with {accelerator.num_processes} process(es) x "
            f"batch {cfg.batch_size}, the checkpoint was saved with {saved.get('num_processes')} x "
            f"{saved.get('batch_size')}"
        )
    accelerator.print(f"resumed from {resume} at step {saved['step']}")
    return saved
