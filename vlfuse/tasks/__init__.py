"""Tasks: loss, metrics and data for each head. ``TASKS`` maps ``model.task`` to its task object."""

from vlfuse.tasks.classification import ClassificationTask
from vlfuse.tasks.grounding import GroundingTask
from vlfuse.tasks.retrieval import RetrievalTask

TASKS = {"grounding": GroundingTask, "retrieval": RetrievalTask, "classification": ClassificationTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"model.task: unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "ClassificationTask", "GroundingTask", "RetrievalTask", "get_task"]
