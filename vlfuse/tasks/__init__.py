"""Tasks, one module each, and their registry: ``TASKS`` maps ``model.task`` to its ``Task`` class.

Adding a task is one module (a ``Task`` subclass, see ``vlfuse.tasks.base``) and one line here.
"""

from vlfuse.schema import ConfigError
from vlfuse.tasks.base import Task, infer, pair_inputs
from vlfuse.tasks.classification import ClassificationTask
from vlfuse.tasks.grounding import GroundingTask
from vlfuse.tasks.matching import MatchingTask
from vlfuse.tasks.retrieval import RetrievalTask

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (GroundingTask, RetrievalTask, ClassificationTask, MatchingTask)
}
# Each task shares its name with its recipe and config folder (vqa: recipes/vqa.py, configs/vqa/); the
# former names are still accepted, in configs and in saved models.
TASK_ALIASES = {"classification": "vqa", "matching": "itm"}


def task_name(name: str) -> str:
    """The task's name for ``name``, a name or a former name (``classification`` -> ``vqa``)."""
    return TASK_ALIASES.get(name, name)


def get_task(name: str) -> Task:
    """The task called ``name`` (a new instance).

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    if task_name(name) not in TASKS:
        raise ConfigError(f"invalid value {name!r} for 'model.task'; allowed: {', '.join(TASKS)}")
    return TASKS[task_name(name)]()


def _alternatives(names: list[str] | tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_task_fusion(task: str, fusion: str) -> None:
    """The task must accept the fusion head; the message says which fusions it takes and which tasks the
    fusion serves.

    Raises:
        ConfigError: naming both keys.
    """
    accepted = get_task(task).fusions
    if fusion in accepted:
        return
    serving = [name for name, cls in TASKS.items() if fusion in cls.fusions]
    served = f"; {fusion} serves {_alternatives(serving)} only" if serving else ""
    raise ConfigError(
        f"model.task={task} with model.fusion.name={fusion}: {task} needs fusion.name="
        f"{_alternatives(accepted)}{served}"
    )


__all__ = [
    "TASKS",
    "ClassificationTask",
    "GroundingTask",
    "MatchingTask",
    "RetrievalTask",
    "Task",
    "check_task_fusion",
    "get_task",
    "infer",
    "pair_inputs",
    "task_name",
]
