"""Stopping hopeless learning rates early (``study.prune``): an Optuna pruner that compares a trial only
with the other rates of its own (mode, train size, seed), never across modes or sizes, whose results the
study needs whatever they are."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from vlfuse.study.grid import Cell, cell_of


class HopelessRatePruner(optuna.pruners.BasePruner):
    """Prunes a trial whose selection metric at an evaluation (``trial.report``) is behind, by more than
    ``margin``, what a finished trial of another rate of the same mode, size and seed had at that step.

    A pruned trial's rate counts as minus infinity when rates are chosen: it was behind a rate that
    finished, so it could not have been the best (up to ``margin``).
    """

    def __init__(self, margin: float) -> None:
        self.margin = margin

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or cell_of(trial) is None:
            return False
        mine = Cell.parse(cell_of(trial))
        value = trial.intermediate_values[step]
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if cell_of(other) is None or step not in other.intermediate_values:
                continue
            peer = Cell.parse(cell_of(other))
            same_group = (peer.mode, peer.size, peer.seed) == (mine.mode, mine.size, mine.seed)
            if same_group and peer.lr != mine.lr and value < other.intermediate_values[step] - self.margin:
                return True
        return False
