"""Classification tasks of the paper: the class list of each, class 0 always No Finding."""

from __future__ import annotations

from ._registry import UnknownNameError

__all__ = ["CLASS_NAMES", "NO_FINDING", "TASKS", "classes_for"]

NO_FINDING = "No Finding"

TASKS: dict[str, tuple[str, ...]] = {
    "ne": (NO_FINDING, "Effusion"),
    "np": (NO_FINDING, "Pneumothorax"),
    "ns": (NO_FINDING, "Subcutaneous Emphysema"),
    "nep": (NO_FINDING, "Effusion", "Pneumothorax"),
    "neps": (NO_FINDING, "Effusion", "Pneumothorax", "Subcutaneous Emphysema"),
}
CLASS_NAMES: tuple[str, ...] = TASKS["neps"]  # every class a task may have, No Finding first


def classes_for(task: str) -> tuple[str, ...]:
    """The ordered class names of ``task`` (``ne``, ``np``, ``ns``, ``nep``, ``neps``)."""
    try:
        return TASKS[task]
    except KeyError:
        raise UnknownNameError(f"unknown task {task!r}; valid: {', '.join(TASKS)}") from None
