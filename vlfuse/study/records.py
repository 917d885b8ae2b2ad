"""Trial records read back from a study storage, as data: anyone who can write to a shared storage
writes them, so a record is kept as numbers and names only (``clean_record``) and a run's folder is always
derived from its cell, never read from a record."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from vlfuse.study.grid import Cell


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


RECORD_NUMBERS = (
    "train_rows",
    "selection",
    "selection_count",
    "pruned",
    "report",
    "best_step",
    "last_step",
    "last_selection",
)
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
        "mode": cell.label,  # what the report compares: <encoders>/<mode> with study.encoders
        "encoders": cell.encoders,
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
