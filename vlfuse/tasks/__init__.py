"""Tasks: loss, metrics and data for each head. ``TASKS`` maps ``model.task`` to its task object."""

from vlfuse.tasks.grounding import GroundingTask

TASKS = {"grounding": GroundingTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"model.task: unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "GroundingTask", "get_task"]
