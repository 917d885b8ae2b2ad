"""Where a study lives: its storage URL (SQLite in the output folder by default, PostgreSQL across
machines), as it may be shown, and the Optuna storage opened on it with heartbeats, retries of dead
workers' trials and, on SQLite, transactions that take the file's write lock as they begin."""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path

import optuna

from vlfuse.schema import Config
from vlfuse.schema.trust import mask_url


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


def open_storage(cfg: Config, url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study storage, with heartbeats and the retry of dead workers' trials. Workers started together
    on an empty database race to create its tables: the loser's insert fails, and it connects again."""
    import sqlalchemy.exc

    sqlite = url.startswith("sqlite")
    # SQLite: several workers write one file; wait for its lock instead of failing at once. No implicit
    # transactions from Python's sqlite3 (isolation_level None): ``serialize_sqlite`` begins each one.
    sqlite_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=sqlite_kwargs if sqlite else None,
                    heartbeat_interval=cfg.study.heartbeat_interval,
                    grace_period=cfg.study.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        cfg.study.max_retries
                    ),
                )
            if sqlite:
                serialize_sqlite(storage)
            return storage
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


def serialize_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """Makes each transaction on a SQLite study storage take the file's write lock when it begins
    (``BEGIN IMMEDIATE``), so that Optuna's read-check-write steps are atomic between workers as they are
    on PostgreSQL (``SELECT ... FOR UPDATE``). Without it Python's sqlite3 begins a transaction only at the
    first write: two workers both read a waiting trial and both run it, or both fail a dead worker's trial
    and queue two retries (Optuna's FAQ: SQLite is not safe for parallel workers). Reads wait for one
    another too: a study's storage is touched a few times per trial.

    Uses ``RDBStorage.engine``, an attribute outside Optuna's documented API (checked by
    tests/test_study.py::test_sqlite_workers_pop_each_waiting_trial_once).
    """
    import sqlalchemy

    def begin_immediate(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(storage.engine, "begin", begin_immediate)
