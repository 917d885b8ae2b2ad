"""The study on Optuna: each cell of the grid is a trial in a study storage that any number of workers
share (SQLite by default, PostgreSQL across machines).

- **Which cell next.** A worker enqueues a cell that no trial has finished, runs or waits for (the cell is
  the trial's user attribute ``cell``, fixed when it is enqueued) and runs the oldest waiting trial. Two
  workers that enqueued the same cell at once both see it: the one with the higher trial number gives way
  (recorded as pruned, ``gave_way``) before it touches the cell's folder, so no cell is trained twice and
  no worker deletes a folder another one is writing.
- **Failures.** Each trial has a heartbeat; a trial whose worker died (silent for ``study.grace_period``
  seconds) is failed by the next worker and queued again. A trial that raises any error is recorded as
  failed with its error and its worker goes on; a cell is run at most ``study.max_retries + 1`` times,
  then reported as failed while the others complete. ``study.trial_timeout`` ends a trial that runs too
  long (an alarm in the worker's process; a launched trial's whole process group).
- **Identity.** A study is its name plus a fingerprint of its config without its axes (modes, sizes,
  seeds, rates) and without settings that change no result (where it is stored, how often it beats, ...):
  running the command with another config under the same name is refused, naming the keys that differ;
  adding sizes, seeds, modes or rates to a finished study runs only the new cells.
- A finished cell is never run again; the report lists every finished cell of the current grid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from vlfuse.schema import Config, ConfigError, shown_dict
from vlfuse.study.grid import Cell, cell_dir, cell_of
from vlfuse.study.pruning import HopelessRatePruner
from vlfuse.study.records import RECORD_TEXT_LIMIT
from vlfuse.study.storage import open_storage, shown_url, storage_url

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class StudyError(RuntimeError):
    """The storage holds a study of the same name run with another config."""


def study_name(cfg: Config) -> str:
    return cfg.study.name or Path(cfg.train.output_dir).resolve().name


# Keys that are no part of a study's identity: its axes (the grid may grow) and settings that change no
# result (where it is stored and written, how workers beat and retry, how the report decides).
NOT_IDENTITY = (
    "study.modes",
    "study.train_sizes",
    "study.seeds",
    "study.lr_grid",
    "study.encoders",  # an axis: each pair's own settings are checked by name (open_study)
    "study.storage",
    "study.name",
    "study.launch",
    "study.keep_models",
    "study.heartbeat_interval",
    "study.grace_period",
    "study.max_retries",
    "study.trial_timeout",
    "study.confidence",
    "study.rope",
    "study.target",
    "train.output_dir",
    "train.cache_dir",
    "train.log_with",
    "train.log_every",
    "train.reuse_cpu_memory",
    "data.num_workers",
    "compare.",
)


def study_identity(cfg: Config) -> dict[str, Any]:
    """The config that makes a study's results what they are (``NOT_IDENTITY`` left out), flat, and its
    SHA-256."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif not any(prefix == key or prefix.startswith(key.rstrip(".") + ".") for key in NOT_IDENTITY):
            flat[prefix] = value

    walk("", shown_dict(cfg))
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=repr).encode()).hexdigest()
    return {"fingerprint": digest, "config": flat}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two identities' flat configs, but for a setting vlfuse has
    added since the study began (absent from ``old``) that ``new`` leaves at its default: the study ran
    then as it runs now."""

    def as_stored(config: dict[str, Any]) -> dict[str, Any]:  # as the storage gives it back (JSON)
        return json.loads(json.dumps(config, default=repr))

    new, defaults = as_stored(new), as_stored(study_identity(Config())["config"])
    return [
        k
        for k in sorted(set(old) | set(new))
        if old.get(k, "<unset>") != new.get(k, "<unset>")
        and not (k not in old and k in defaults and new.get(k) == defaults[k])
    ]


def open_study(cfg: Config, grid: list[Cell]) -> optuna.Study:
    """Creates or loads the study, with heartbeats and the retry of trials of dead workers; records its
    identity (``study_identity``) and every cell it has been asked for.

    Raises:
        StudyError: a study of that name in the storage was run with another config (the keys named).
    """
    url = storage_url(cfg)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = open_storage(cfg, url)
    study = optuna.create_study(
        study_name=study_name(cfg),
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=0),  # samples nothing: a trial's cell is enqueued with it
        pruner=HopelessRatePruner(cfg.study.prune_margin) if cfg.study.prune else optuna.pruners.NopPruner(),
        direction="maximize",
        load_if_exists=True,
    )
    identity = study_identity(cfg)
    recorded = study.user_attrs.get("identity")
    same = recorded is not None and recorded["fingerprint"] == identity["fingerprint"]
    old, new = (recorded or identity)["config"], identity["config"]
    differ = [] if recorded is None or same else changed_keys(old, new)
    if differ:
        shown = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in differ[:5])
        raise StudyError(
            f"the study {study.study_name!r} in {shown_url(url)} was run with another config ({shown}"
            f"{'; ...' if len(differ) > 5 else ''}): its results would be mixed with this config's. Only its "
            "axes (study.modes, train_sizes, seeds, lr_grid) may change; use another study.name or "
            "train.output_dir for this config"
        )
    if not same:  # a new study, or one begun before vlfuse added a setting (at its default here)
        study.set_user_attr("identity", identity)
    _check_folder(cfg, study, url)
    pairs = dict(study.user_attrs.get("encoders", {}))
    changed = [n for n, pair in cfg.study.encoders.items() if n in pairs and pairs[n] != pair]
    if changed:
        raise StudyError(
            f"the study {study.study_name!r} in {shown_url(url)} ran the encoders pair {changed[0]!r} with "
            f"other settings ({pairs[changed[0]]!r}; now {cfg.study.encoders[changed[0]]!r}): give the new "
            "towers a new name"
        )
    if set(cfg.study.encoders) - set(pairs):
        study.set_user_attr("encoders", {**pairs, **cfg.study.encoders})
    keys = [c.key for c in grid]
    asked = study.user_attrs.get("cells", [])
    if set(keys) - set(asked):
        study.set_user_attr("cells", asked + [k for k in keys if k not in asked])
    return study


def _check_folder(cfg: Config, study: optuna.Study, url: str) -> None:
    """A study named by default (its output folder's name) is written to one folder: another folder of
    the same name on the same storage (``/a/study`` and ``/b/study`` on one PostgreSQL) is refused rather
    than merged. With ``study.name`` set, workers may write to different folders (mount points differ
    between machines).

    Raises:
        StudyError: the default name, and the study was written to another folder.
    """
    folder = str(Path(cfg.train.output_dir).resolve())
    folders = list(study.user_attrs.get("folders", []))
    if not cfg.study.name and folders and folder not in folders:
        raise StudyError(
            f"the study {study.study_name!r} in {shown_url(url)} is written to {folders[0]}, not to "
            f"{folder}: two output folders of the same name would share one study. Set study.name (the same "
            "on every worker of one study, a new one for a new study)"
        )
    if folder not in folders:
        study.set_user_attr("folders", folders + [folder])


def _finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Complete, or stopped by the pruner after training (a result; a trial that gave way is not)."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.PRUNED and "record" in trial.user_attrs
    )


def cells_to_run(study: optuna.Study, keys: list[str], max_retries: int) -> list[str]:
    """The cells of ``keys`` no trial has finished, runs or waits for, and that have failed at most
    ``max_retries`` times."""
    trials = study.get_trials(deepcopy=False)
    taken = {
        cell_of(t) for t in trials if _finished(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)
    }
    failures = Counter(cell_of(t) for t in trials if t.state == TrialState.FAIL)
    return [k for k in keys if k not in taken and failures[k] <= max_retries]


def failed_cells(study: optuna.Study, keys: list[str], max_retries: int) -> dict[str, str]:
    """The cells of ``keys`` that failed more than ``max_retries`` times and never finished: cell -> the
    newest failure's error."""
    trials = study.get_trials(deepcopy=False)
    finished = {cell_of(t) for t in trials if _finished(t)}
    failures = [t for t in trials if t.state == TrialState.FAIL and cell_of(t) in keys]
    counts = Counter(cell_of(t) for t in failures)
    newest = {cell_of(t): t.user_attrs.get("error", "the worker died") for t in failures}
    return {k: newest[k] for k in keys if counts[k] > max_retries and k not in finished}


def gives_way(study: optuna.Study, trial: optuna.Trial, key: str) -> int | None:
    """The number of another trial of ``key`` this trial gives way to: one that finished, or one with a
    lower number that runs or waits (two workers enqueued the cell at once; the lower number keeps it)."""
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or cell_of(t) != key:
            continue
        if _finished(t) or (t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number):
            return t.number
    return None


class TrialTimeout(RuntimeError):
    """A trial ran past ``study.trial_timeout``."""


@contextmanager
def time_limit(seconds: int | None):
    """Raises ``TrialTimeout`` in this (the main) thread after ``seconds`` (SIGALRM). A wait inside a C
    call (a hung collective) ends when the call returns; a launched trial is limited by its launcher."""
    if not seconds or threading.current_thread() is not threading.main_thread() or os.name != "posix":
        yield
        return

    def expire(signum, frame):
        raise TrialTimeout(f"the trial ran past study.trial_timeout={seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def log_event(root: Path, **event: Any) -> None:
    """One line of ``trials.jsonl``: what each worker started and finished, when."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "trials.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "worker": WORKER, **event}) + "\n")


class Worker:
    """This process's share of a study: it enqueues cells no trial has taken and runs trials until none
    is left (``run``); ``objective`` is one trial: give way if another trial has the cell, else train it.

    Args:
        run_cell: ``run_cell(cell, run_dir, trial)`` trains one cell and returns its record
            (``selection``, ``report``, ...; ``pruned`` if the study's pruner stopped it, which the trial
            is then recorded as). An error in it fails the trial (its message kept as the trial's
            ``error``) and the worker goes on; a ``ConfigError`` stops the study.
    """

    def __init__(self, cfg: Config, study: optuna.Study, grid: list[Cell], run_cell: Callable) -> None:
        self.cfg, self.study, self.run_cell = cfg, study, run_cell
        self.root = Path(cfg.train.output_dir)
        self.keys = [c.key for c in grid]
        self.trained = 0
        self.order = random.Random(WORKER)  # each worker its own order: fewer collisions between workers
        self.config_error: ConfigError | None = None

    def objective(self, trial: optuna.Trial) -> float:
        key = cell_of(trial)
        if key is None or key not in self.keys:  # no cell, or one of another worker's grid: leave it to them
            trial.set_user_attr("gave_way", -1)
            raise optuna.TrialPruned(f"cell {key!r} is not in this worker's grid")
        other = gives_way(self.study, trial, key)
        if other is not None:
            trial.set_user_attr("gave_way", other)
            raise optuna.TrialPruned(f"trial {other} has this cell")
        cell = Cell.parse(key)
        run_dir = cell_dir(self.root, cell)
        shutil.rmtree(run_dir, ignore_errors=True)  # a retried cell starts afresh
        log_event(self.root, event="start", cell=key, trial=trial.number)
        trial.set_user_attr("worker", WORKER)
        try:
            with time_limit(self.cfg.study.trial_timeout):
                record = self.run_cell(cell, run_dir, trial)
        except Exception as err:
            if isinstance(err, ConfigError):
                self.config_error = err
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:RECORD_TEXT_LIMIT])
            log_event(self.root, event="failed", cell=key, trial=trial.number, error=str(err)[:200])
            print(f"study trial {key} failed: {type(err).__name__}: {err}", flush=True)
            raise
        trial.set_user_attr("record", record)
        log_event(self.root, event="end", cell=key, trial=trial.number)
        self.trained += 1
        if record.get("pruned"):
            raise optuna.TrialPruned(f"behind another rate at step {record['pruned']}")
        value = record["selection"]
        return value if value is not None and math.isfinite(value) else -math.inf

    def run(self) -> int:
        """Runs trials until no cell is left to start; returns how many this worker trained."""
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is said by ``objective``
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: failed, queued again
            todo = cells_to_run(self.study, self.keys, self.cfg.study.max_retries)
            if not todo and not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                return self.trained
            if todo:
                self.study.enqueue_trial({}, user_attrs={"cell": self.order.choice(todo)})
            self.study.optimize(self.objective, n_trials=1, catch=(Exception,))
            if self.config_error is not None:
                raise self.config_error


def run_worker(cfg: Config, study: optuna.Study, grid: list[Cell], run_cell: Callable) -> int:
    """Runs this worker's share of the study (``Worker``); returns how many trials it trained."""
    return Worker(cfg, study, grid, run_cell).run()
