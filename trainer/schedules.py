"""λ schedules: the weight of cross-entropy per epoch (L = λ·CE + (1−λ)·L_att)."""

from __future__ import annotations

from collections.abc import Callable

from ._registry import Registry

__all__ = ["SCHEDULES", "create_schedule"]

Schedule = Callable[[int], float]
SCHEDULES: Registry[Schedule] = Registry("lambda schedule")


@SCHEDULES.register("fixed")
def _fixed(value: float = 1.0) -> Schedule:
    return lambda epoch: float(value)


@SCHEDULES.register("adaptive")
def _adaptive(slope: float = 0.023, floor: float = 0.2) -> Schedule:
    """The paper's λ = *: ``max(floor, 1 − slope·epoch)`` with epochs counted from 0."""
    return lambda epoch: max(float(floor), 1.0 - float(slope) * epoch)


def create_schedule(name: str, **kwargs) -> Schedule:
    return SCHEDULES.create(name, **kwargs)
