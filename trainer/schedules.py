"""λ schedules: the weight of cross-entropy per epoch (L = λ·CE + (1−λ)·L_att).

A trial's ``attention.lambda`` is a number in [0, 1] (the ``fixed`` schedule) or the name of a
schedule registered here, and ``attention.schedule`` holds that schedule's parameters (its
defaults where left out). A schedule is a builder whose keyword arguments *are* its parameters:
their names, defaults and types (``float`` or ``int``) are what the trial config accepts and what
a sweep's ``type: lambda`` parameter can search, one branch per schedule name. Builders check
their values and raise ``ValueError`` naming the parameter.

Adding a schedule is one decorated builder in this file: the config, the search spaces (Optuna
and Ray), the validation of every searched value and the MLflow params follow from it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._registry import Registry

__all__ = [
    "DEFAULT_SCHEDULE",
    "FIXED",
    "SCHEDULES",
    "ScheduleParameter",
    "create_schedule",
    "resolve_schedule",
    "schedule_names",
    "schedule_parameters",
]

Schedule = Callable[[int], float]
SCHEDULES: Registry[Schedule] = Registry("lambda schedule")
FIXED = "fixed"  # a number in `attention.lambda`; its one parameter is that number
DEFAULT_SCHEDULE = "adaptive"  # the paper's λ = *: what a searched λ tries unless told otherwise


def _check(ok: bool, name: str, value: float, want: str) -> None:
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be {want}, got {value}")


@SCHEDULES.register(FIXED)
def fixed(value: float = 1.0) -> Schedule:
    """The same λ every epoch."""
    _check(0.0 <= value <= 1.0, "lambda", value, "in [0, 1]")
    return lambda epoch: float(value)


@SCHEDULES.register("adaptive")
def adaptive(slope: float = 0.023, floor: float = 0.2) -> Schedule:
    """The paper's λ = *: ``max(floor, 1 − slope·epoch)`` with epochs counted from 0."""
    _check(slope > 0.0, "slope", slope, "> 0")
    _check(0.0 <= floor <= 1.0, "floor", floor, "in [0, 1]")
    return lambda epoch: max(float(floor), 1.0 - float(slope) * epoch)


def create_schedule(name: str, **kwargs) -> Schedule:
    return SCHEDULES.create(name, **kwargs)


@dataclass(frozen=True)
class ScheduleParameter:
    """One keyword argument of a schedule's builder."""

    name: str
    default: float
    kind: type  # float or int


def schedule_parameters(name: str) -> dict[str, ScheduleParameter]:
    """The parameters of schedule ``name``, read off its builder's signature."""
    params = inspect.signature(SCHEDULES.get(name), eval_str=True).parameters.values()
    return {
        p.name: ScheduleParameter(p.name, p.default, int if p.annotation is int else float) for p in params
    }


def schedule_names() -> list[str]:
    """The names ``attention.lambda`` may take besides a number: every schedule but ``fixed``."""
    return [n for n in SCHEDULES.names() if n != FIXED]


def resolve_schedule(name: str, params: Mapping[str, object]) -> dict[str, float]:
    """``params`` of schedule ``name`` checked and completed with its defaults (a ``ValueError`` names
    an unknown parameter or a bad value)."""
    spec = schedule_parameters(name)
    unknown = sorted(set(params) - set(spec))
    if unknown:
        takes = ", ".join(spec) or "no parameters"
        raise ValueError(f"the {name!r} schedule has no parameter {', '.join(unknown)} (it takes {takes})")
    out: dict[str, float] = {}
    for n, p in spec.items():
        v = params.get(n, p.default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{n} must be a number, got {v!r}")
        if p.kind is int:
            if not float(v).is_integer():
                raise ValueError(f"{n} must be a whole number, got {v}")
            out[n] = int(v)
        else:
            out[n] = float(v)
    create_schedule(name, **out)  # the builder checks the values
    return out


@SCHEDULES.register("cosine")
def cosine(floor: float = 0.2, period: int = 50) -> Schedule:
    """From 1 down to ``floor`` along a half cosine over ``period`` epochs, then ``floor``."""
    _check(0.0 <= floor <= 1.0, "floor", floor, "in [0, 1]")
    _check(period >= 1, "period", period, ">= 1")

    def lam(epoch: int) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(epoch, period) / period))

    return lam
