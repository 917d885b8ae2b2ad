"""Resumable checkpoints: publish, verify, prune, resume.

A checkpoint is ``output_dir/checkpoints/step_<N>/``: Accelerate's state (model, optimizer, RNG states,
data position) plus ``trainer_state.json`` (step, scheduler state as JSON, counters and every file's
SHA-256, sub-folders included) and ``trainer_state.sig`` (an HMAC of it under the user's key). It is
written to ``.tmp_step_<N>`` and published by rename, and old checkpoints are pruned only after that, so a
crash at any point leaves the previous checkpoint intact. Resuming verifies every file against its
checksum and refuses a file not in the list; ``latest`` falls back past damaged checkpoints with a
warning. A checkpoint holding files only unpickling can read (FSDP's sharded state, DeepSpeed) is loaded
only with a valid signature: written by a run of the same user (``verify_checkpoint``).

Checkpoints are slim: the model file holds what training can change (trainable parameters, and the
buffers of modules that train), not the frozen weights, which the run rebuilds from their source (timm,
transformers, a local file). ``trainer_state.json`` records a fingerprint of the frozen weights per part
instead, and resuming fails, naming the part, if the rebuilt frozen weights differ. ``final/`` is always
whole. (Under FSDP and DeepSpeed, Accelerate saves sharded states its own way, and checkpoints stay whole.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open

from vlfuse.data.feature_cache import default_cache_dir, state_fingerprint
from vlfuse.schema import TrainConfig

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
ABANDONED_DIR = "abandoned"  # checkpoints of a run that a later one replaced (never pruned)
MODEL_FILE = "model.safetensors"  # Accelerate's name for the first model's weights
# Prefixes that wrappers add to state-dict names (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


SIGNATURE = "trainer_state.sig"  # HMAC of trainer_state.json under this user's key (``signing_key``)
KEY_FILE = "checkpoint.key"
# Files that only unpickling can read: torch.distributed.checkpoint's ``.metadata`` (FSDP's sharded state
# dict) and DeepSpeed's ``.pt`` states. Every other file of a checkpoint is safetensors, JSON, or read by
# Accelerate with ``torch.load(weights_only=True)``.
UNPICKLED_NAMES = (".metadata",)
UNPICKLED_SUFFIXES = (".pt",)


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged or not this run's; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(path: Path) -> list[str]:
    """Every file of a checkpoint folder, sub-folders included (a sharded state's shards), as relative
    POSIX paths, except the trainer state and its signature."""
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name not in (TRAINER_STATE, SIGNATURE)
    )


def needs_unpickling(names: list[str]) -> list[str]:
    """The files of a checkpoint that only unpickling can read (``UNPICKLED_NAMES``/``_SUFFIXES``)."""
    return [n for n in names if Path(n).name in UNPICKLED_NAMES or Path(n).suffix in UNPICKLED_SUFFIXES]


def key_file() -> Path:
    """``$VLFUSE_CACHE`` (or ``~/.cache/vlfuse``) ``/checkpoint.key``: this user's checkpoint signing key."""
    return default_cache_dir().parent / KEY_FILE


def signing_key(create: bool = False) -> bytes | None:
    """This user's random 32-byte key (created, readable by the user only, when ``create``), with which
    vlfuse signs the checkpoints it writes; None when there is none and ``create`` is false."""
    path = key_file()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes creating it at once keep the first one's key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        except FileExistsError:
            pass
    return path.read_bytes()


def _signature(key: bytes, state_bytes: bytes) -> str:
    return hmac.new(key, state_bytes, hashlib.sha256).hexdigest()


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
    """Checks a checkpoint before anything of it is loaded: it has a checksum list, every file in the
    folder (sub-folders included) is in it, every listed file is present with the SHA-256 recorded when
    it was saved; and one holding files that only unpickling can read (``needs_unpickling``) carries
    vlfuse's signature under this user's key (``signing_key``): it was written by a run of this user's.

    Returns:
        The checkpoint's trainer state.

    Raises:
        CheckpointError: naming the missing, unlisted, truncated or corrupted file, or saying why the
            checkpoint is not this user's.
    """
    state_file = path / TRAINER_STATE
    try:
        state_bytes = state_file.read_bytes()
        state = json.loads(state_bytes)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_file} is missing or unreadable: {err}") from None
    listed = state.get("files") if isinstance(state, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise CheckpointError(
            f"{path} has no checksum list in {TRAINER_STATE} (not written by vlfuse, or by a version that "
            "did not list every file): not loaded"
        )
    present = checkpoint_files(path)
    if unlisted := sorted(set(present) - set(listed)):
        raise CheckpointError(f"{path / unlisted[0]} is not one of the files the run wrote: not loaded")
    for name, expected in listed.items():
        file = path / name
        if not file.is_relative_to(path) or ".." in Path(name).parts or not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file} is truncated or corrupted (its checksum does not match)")
    if pickled := needs_unpickling(present):
        key, sig_file = signing_key(), path / SIGNATURE
        signed = sig_file.is_file() and key is not None
        if not signed or not hmac.compare_digest(sig_file.read_text().strip(), _signature(key, state_bytes)):
            raise CheckpointError(
                f"{path} holds files that only unpickling can read ({', '.join(pickled[:3])}) and was not "
                f"signed by a run of yours (key {key_file()}): not loaded. Resume only from checkpoints your "
                "own runs wrote; processes on several machines need the same key (a shared VLFUSE_CACHE)"
            )
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


def _unwrapped_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


class FrozenWeights:
    """The frozen weights of a run: left out of its checkpoints, and fingerprinted so that a resume can
    tell whether the weights it rebuilt are the ones the checkpoint was trained with.

    Args:
        model: the unwrapped model, trainable/frozen split applied (``frozen_state_names``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        state, per_part = model.state_dict(), model.frozen_state_names()
        self.names = {n for names in per_part.values() for n in names}
        self.saved_names = set(state) - self.names
        self.record = {
            part: {"tensors": len(names), "sha256": state_fingerprint({n: state[n] for n in names})}
            for part, names in per_part.items()
        }

    def attach(self, accelerator: Accelerator) -> bool:
        """Makes ``accelerator.save_state`` leave the frozen weights out; False (checkpoints stay whole)
        where Accelerate saves sharded states (FSDP, DeepSpeed) or nothing is frozen."""
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if not self.names or sharded:
            self.record = {}
            return False
        accelerator.register_save_state_pre_hook(self._drop_frozen)
        return True

    def _drop_frozen(self, models: list, weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for state in weights[:1]:
            for name in [n for n in state if _unwrapped_name(n) in self.names]:
                del state[name]

    def check(self, path: Path, saved: dict[str, dict[str, Any]]) -> None:
        """Checks a slim checkpoint against the rebuilt model before loading it.

        Raises:
            CheckpointError: a part's frozen weights differ from the checkpoint's fingerprint, or the
                checkpoint's model file does not hold exactly the weights that train.
        """
        for part, record in saved.items():
            mine = self.record.get(part)
            if mine != record:
                now = f"{mine['sha256'][:12]}, {mine['tensors']} tensors" if mine else "nothing frozen"
                raise CheckpointError(
                    f"cannot resume from {path}: the frozen weights of model.{part} differ from those the "
                    f"checkpoint was trained with (fingerprint {record['sha256'][:12]}, {record['tensors']} "
                    f"tensors; this run: {now}). Rebuild the model from the same weights (model.*.name, "
                    "pretrained, checkpoint) and the same trainable_encoders/tuning, or start a new run"
                )
        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            stored = {_unwrapped_name(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
        if stored != self.saved_names:
            missing, extra = sorted(self.saved_names - stored), sorted(stored - self.saved_names)
            raise CheckpointError(
                f"cannot resume from {path}: its model file does not match this model's trainable state "
                f"(missing {len(missing)}: {missing[:3]}; unexpected {len(extra)}: {extra[:3]})"
            )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: dict[str, Any],
    keep_last: int,
    per_process: Callable[[Path], None] | None = None,
) -> Path:
    """Saves into a temporary folder, records each file's checksum, publishes the folder by rename, and
    only then prunes old checkpoints: a crash at any point leaves the previous checkpoint intact.

    Args:
        state: the loop's own state (``step`` at least), written to ``trainer_state.json``.
        per_process: called by every process with the folder, to write its own files (a stream's
            position) before the checksums are taken.
    """
    checkpoint_dir = output_dir / "checkpoints"
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state['step']}"
    tmp = checkpoint_dir / f".tmp_{CHECKPOINT_PREFIX}{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if per_process is not None:
        per_process(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {name: _sha256(tmp / name) for name in checkpoint_files(tmp)}
        state_bytes = json.dumps({**state, "files": files}, indent=2).encode()
        (tmp / SIGNATURE).write_text(_signature(signing_key(create=True), state_bytes))
        (tmp / TRAINER_STATE).write_bytes(state_bytes)  # written last: it marks a complete checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        # The checkpoint just written is never pruned, whatever the others' steps.
        others = [p for p in list_checkpoints(checkpoint_dir) if p != final]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def set_aside_abandoned(
    checkpoint_dir: Path, start_step: int, warn: Callable[[str], None] = print
) -> Path | None:
    """Moves the checkpoints newer than ``start_step`` (the step this run starts from: 0 when fresh) into
    ``checkpoints/abandoned/<time>_from_step_<N>/``: they belong to a run this one replaces, and must
    neither be taken for ``latest`` nor crowd out this run's own checkpoints when pruning.

    Returns:
        The folder they were moved to, or None when there were none.
    """
    newer = [
        p for p in list_checkpoints(checkpoint_dir) if int(p.name[len(CHECKPOINT_PREFIX) :]) > start_step
    ]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = checkpoint_dir / ABANDONED_DIR / f"{stamp}_from_step_{start_step}"
    target.mkdir(parents=True, exist_ok=True)
    for path in newer:
        os.replace(path, target / path.name)
    warn(
        f"moved {len(newer)} checkpoint(s) of an abandoned run ({', '.join(p.name for p in newer)}: newer "
        f"than this run's start at step {start_step}) to {target}"
    )
    return target


def restore_checkpoint(
    accelerator: Accelerator, cfg: TrainConfig, output_dir: Path, frozen: FrozenWeights
) -> dict[str, Any] | None:
    """Loads ``train.resume_from`` into the prepared objects (model, optimizer, RNG, data position);
    a slim checkpoint's frozen-weight fingerprints are checked first (``FrozenWeights.check``). Checkpoints
    of ``output_dir`` newer than the start are set aside (``set_aside_abandoned``).

    Returns:
        The checkpoint's trainer state (step, scheduler, counters), or None when starting fresh.
    """
    resume = resolve_resume(cfg.resume_from, output_dir, accelerator.print)
    if accelerator.is_main_process:
        start = int(json.loads((resume / TRAINER_STATE).read_text())["step"]) if resume else 0
        set_aside_abandoned(output_dir / "checkpoints", start, accelerator.print)
    accelerator.wait_for_everyone()
    if resume is None:
        if cfg.resume_from == "latest":
            accelerator.print(
                f"resume_from=latest: no usable checkpoint in {output_dir / 'checkpoints'}, starting fresh"
            )
        return None
    saved = json.loads((resume / TRAINER_STATE).read_text())
    slim = saved.get("frozen_weights")
    if slim:
        frozen.check(resume, slim)
        accelerator.load_state(str(resume), strict=False)  # the missing keys are the checked frozen ones
    else:
        accelerator.load_state(str(resume))
    if saved.get("num_processes") != accelerator.num_processes or saved.get("batch_size") != cfg.batch_size:
        accelerator.print(
            f"warning: the data order changes: resuming with {accelerator.num_processes} process(es) x "
            f"batch {cfg.batch_size}, the checkpoint was saved with {saved.get('num_processes')} x "
            f"{saved.get('batch_size')}"
        )
    accelerator.print(f"resumed from {resume} at step {saved['step']}")
    return {**saved, "path": str(resume)}
