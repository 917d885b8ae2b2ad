"""Training and evaluation with Accelerate: ``train(cfg)`` (``loop.py``, the one loop every recipe shares),
set-up (``setup.py``), data (``data.py``), what a run reports and saves (``report.py``), evaluation
(``evaluation.py``)."""

from vlfuse.training.evaluation import evaluate, evaluate_saved
from vlfuse.training.loop import train
from vlfuse.training.report import USER_ERRORS, TrainingError, format_metrics, push_final
from vlfuse.training.setup import build_model

__all__ = [
    "USER_ERRORS",
    "TrainingError",
    "build_model",
    "evaluate",
    "evaluate_saved",
    "format_metrics",
    "push_final",
    "train",
]
