"""The study on Optuna: each cell is a trial of a grid (``GridSampler``) in a study storage that any
number of workers share (SQLite by default, PostgreSQL across machines).

- Each trial has a heartbeat; a trial whose worker died (silent for ``study.grace_period`` seconds) is
  failed by the next worker and queued again (``RetryHeartbeatStaleTrialCallback``), up to
  ``study.max_retries`` times.
- A finished (complete) cell is never run again; a cell whose trial failed (an error, an interrupted
  worker) is queued again when the command is run again.
- Optuna's ``GridSampler`` hands out the first pass of the grid by trial number (no two workers draw the
  same cell); a trial asked for after that (a worker racing another for the last cells) that finds its
  cell taken by another trial gives way and is recorded as pruned, without training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from vlfuse.schema import Config
from vlfuse.schema.trust import mask_url
from vlfuse.study.grid import Cell, cell_dir
from vlfuse.study.pruning import HopelessRatePruner

WORKER = f"{socket.gethostname()}:{os.getpid()}"
# A surplus trial's wait before it checks whether another trial took its cell: both write their cell at
# once when asked, so after this pause each sees the other.
CLAIM_WAIT_S = 1.0


class StudyError(RuntimeError):
    """The storage holds a study of the same name with another grid."""


def storage_url(cfg: Config) -> str:
    """``study.storage``, or the SQLite file in the output folder. A plain ``postgresql://`` URL is read
    with psycopg 3 (what ``pip install vlfuse[postgres]`` brings) where psycopg2, SQLAlchemy's default
    driver for it, is not installed."""
    url = cfg.study.storage or f"sqlite:///{(Path(cfg.train.output_dir) / 'study.db').resolve()}"
    if url.startswith("postgresql://") and not importlib.util.find_spec("psycopg2"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def shown_url(url: str) -> str:
    """A storage URL as it may be printed or saved: user, password and secret query parameters masked
    (``vlfuse.schema.trust.mask_url``)."""
    return mask_url(url)


def study_name(cfg: Config) -> str:
    return cfg.study.name or Path(cfg.train.output_dir).resolve().name


def open_study(cfg: Config, grid: list[Cell]) -> optuna.Study:
    """Creates or loads the study (its grid recorded in it), with heartbeats and the retry of trials of
    dead workers.

    Raises:
        StudyError: if a study of that name in the storage has another grid.
    """
    url = storage_url(cfg)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = _storage(cfg, url)
    keys = [c.key for c in grid]
    study = optuna.create_study(
        study_name=study_name(cfg),
        storage=storage,
        sampler=optuna.samplers.GridSampler({"cell": keys}, seed=0),
        pruner=HopelessRatePruner(cfg.study.prune_margin) if cfg.study.prune else optuna.pruners.NopPruner(),
        direction="maximize",
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("cells")
    if recorded is None:
        study.set_user_attr("cells", keys)
    elif recorded != keys:
        raise StudyError(
            f"the study {study.study_name!r} in {shown_url(url)} was started with another grid "
            f"({len(recorded)} cells; this config makes {len(keys)}): change study.name or "
            "train.output_dir to start another"
        )
    return study


def _storage(cfg: Config, url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study storage, with heartbeats and the retry of dead workers' trials. Workers started together
    on an empty database race to create its tables: the loser's insert fails, and it connects again."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    # SQLite: several workers write one file; wait for its lock instead of failing at once.
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                    heartbeat_interval=cfg.study.heartbeat_interval,
                    grace_period=cfg.study.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        cfg.study.max_retries
                    ),
                )
        # PostgreSQL reports two workers creating one table as a unique violation on its catalogue
        # (IntegrityError) or as "relation already exists" (ProgrammingError), depending on the timing.
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError,
        ):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _cell_of(trial: optuna.trial.FrozenTrial) -> str | None:
    return trial.params.get("cell")


def settled_cells(study: optuna.Study) -> set[str]:
    """Cells this worker need not start: complete, stopped by the pruner, running, or failed in this run
    of the command."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return {_cell_of(t) for t in study.get_trials(deepcopy=False, states=states)}


def work_left(study: optuna.Study, keys: list[str]) -> bool:
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    return bool(set(keys) - settled_cells(study))


def queue_failed_cells(study: optuna.Study, keys: list[str]) -> list[str]:
    """Queues again each cell whose trials all failed (an error, an interrupted worker) and which no
    trial runs or waits for, as Optuna's retry of a dead worker's trial does (a copy of the newest failed
    trial, its grid position included); returns them."""
    trials = study.get_trials(deepcopy=False)
    busy = {
        _cell_of(t)
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        or (t.state == TrialState.PRUNED and "record" in t.user_attrs)  # stopped by the pruner: finished
    }
    newest_failure = {_cell_of(t): t for t in trials if t.state == TrialState.FAIL and _cell_of(t) in keys}
    queued = sorted(set(newest_failure) - busy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
        for key in queued:
            retry(study, newest_failure[key])
    return queued


def gives_way(study: optuna.Study, trial: optuna.Trial, key: str, n_cells: int) -> int | None:
    """The number of another trial that has (or runs) ``key``, if this trial should give way to it.

    A trial of the grid's first pass (number below the grid's size) or a queued retry owns its cell; a
    surplus trial waits ``CLAIM_WAIT_S`` and gives way to a complete trial of its cell or a running one
    with a lower number.
    """
    if trial.number < n_cells:
        return None
    mine = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(mine) is not None:
            return None
    time.sleep(CLAIM_WAIT_S)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number != trial.number and _cell_of(t) == key:
            if t.state == TrialState.COMPLETE or t.number < trial.number:
                return t.number
    return None


def log_event(root: Path, **event: Any) -> None:
    """One line of ``trials.jsonl``: what each worker started and finished, when."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "trials.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "worker": WORKER, **event}) + "\n")


def run_worker(
    cfg: Config,
    study: optuna.Study,
    grid: list[Cell],
    run_cell: Callable[[Cell, Path, optuna.Trial], dict[str, Any]],
) -> int:
    """Runs trials until no cell is left to start; returns how many this worker trained.

    ``run_cell(cell, run_dir, trial)`` trains one cell and returns its record (``selection``, ``report``,
    ...; ``pruned`` if the study's pruner stopped it, which the trial is then recorded as).
    """
    root = Path(cfg.train.output_dir)
    keys = [c.key for c in grid]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, queued again
    queue_failed_cells(study, keys)
    trained = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal trained
        key = trial.suggest_categorical("cell", keys)
        other = gives_way(study, trial, key, len(keys))
        if other is not None:
            trial.set_user_attr("gave_way", other)
            raise optuna.TrialPruned(f"trial {other} has this cell")
        cell = Cell.parse(key)
        run_dir = cell_dir(root, cell)
        shutil.rmtree(run_dir, ignore_errors=True)  # a retried cell starts afresh
        log_event(root, event="start", cell=key, trial=trial.number)
        trial.set_user_attr("worker", WORKER)
        record = run_cell(cell, run_dir, trial)
        trial.set_user_attr("record", record)
        log_event(root, event="end", cell=key, trial=trial.number)
        trained += 1
        if record.get("pruned"):
            raise optuna.TrialPruned(f"behind another rate at step {record['pruned']}")
        value = record["selection"]
        return value if value is not None and math.isfinite(value) else -math.inf

    def stop_when_done(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if not work_left(study, keys):
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # GridSampler stops a worker once every grid cell has been drawn; queued retries may still wait
    while work_left(study, keys):
        before = trained
        study.optimize(objective, callbacks=[stop_when_done])
        if trained == before:  # every cell it was handed was another worker's: nothing left for this one
            break
    return trained


def finished_records(study: optuna.Study, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """The record of each finished trial, complete or stopped by the pruner (one per cell: the newest if
    a cell finished twice), read from the storage as data (``clean_record``): a record that is not one of
    ``keys``' cells or holds anything but numbers and names is skipped, and the skips are printed."""
    records: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if "record" not in t.user_attrs:
            continue
        try:
            record = clean_record(t.user_attrs["record"], keys)
        except (TypeError, ValueError, KeyError) as err:
            skipped.append(f"trial {t.number}: {err}")
            continue
        records[record["cell"]] = {**record, "trial": t.number}
    if skipped:
        print(f"warning: {len(skipped)} trial record(s) in the storage skipped: " + "; ".join(skipped[:5]))
    return list(records.values())


RECORD_NUMBERS = ("train_rows", "selection", "selection_count", "pruned", "report")
RECORD_TEXT_LIMIT = 2000  # a training error's message, shortened


def _number(value: Any, key: str) -> float | int | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise TypeError(f"{key} is not a number: {type(value).__name__}")


def clean_record(raw: Any, keys: list[str] | None = None) -> dict[str, Any]:
    """A trial record from the storage as numbers and names only: its cell (one of ``keys`` when given),
    the mode, size, seed and rate derived from the cell, numbers for the metrics and costs, and the error
    as text. Nothing of it is a path: a run's folder is always derived from its cell (``cell_dir``).

    Raises:
        TypeError, ValueError, KeyError: a record that is not one vlfuse writes.
    """
    if not isinstance(raw, dict):
        raise TypeError("not a record")
    cell = Cell.parse(raw["cell"])
    if keys is not None and cell.key not in keys:
        raise ValueError(f"cell {cell.key!r} is not in this study's grid")
    record: dict[str, Any] = {
        "cell": cell.key,
        "mode": cell.mode,
        "size": cell.size,
        "seed": cell.seed,
        "lr": cell.lr,
    }
    for key in RECORD_NUMBERS:
        record[key] = _number(raw.get(key), key)
    for key in ("report_metrics", "cost"):
        values = raw.get(key) or {}
        if not isinstance(values, dict):
            raise TypeError(f"{key} is not a mapping")
        record[key] = {
            str(k): v
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)  # the split's name is left out
        }
    error = raw.get("error")
    record["error"] = None if error is None else str(error)[:RECORD_TEXT_LIMIT]
    return record
