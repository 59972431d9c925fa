"""Search-parameter types of a sweep file: each knows how to become a Ray Tune space, an Optuna
suggestion, the probes that validate it, and trial-config overrides.

A sampled value reaches a trial through :meth:`overrides`, whichever searcher drew it: Ray's
variant generator and Ray's ``OptunaSearch`` both hand the trainable one value per parameter
key (a conditional parameter's draw is a nested mapping: Optuna's ``a/b`` names are unflattened
by Ray). Adding a type is one class here, plus its entry in :data:`Param`.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.schedules import DEFAULT_SCHEDULE, FIXED, schedule_names, schedule_parameters

__all__ = ["Choice", "Grid", "IntRange", "LambdaParam", "LogUniform", "Param", "Range", "Uniform"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """``[low, high]``, both included."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low <= self.high or math.isnan(self.low) or math.isnan(self.high):
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class _Param(_Strict):
    """What every search-parameter type does; a subclass overrides what differs.

    ``when: {other.key: [values]}`` makes a parameter conditional: it is drawn (and reaches the
    trial) only where every named parameter, searched before it, took one of those values, so
    the searcher spends nothing on a setting the trial would not use (``attention.tau`` exists
    for mode ``soft`` only).
    """

    enumerates: ClassVar[bool] = False  # a grid axis: every value runs (only with `algorithm: grid`)
    when: dict[str, list[Any]] | None = Field(
        None, description="Drawn only where these earlier params took these values."
    )

    def applies(self, drawn: dict[str, Any]) -> bool:
        """Whether the condition holds for the values ``drawn`` so far (keys absent: it does not)."""
        return all(drawn.get(k, _ABSENT) in values for k, values in (self.when or {}).items())

    @property
    def size(self) -> int:
        """How many trials one pass over this parameter takes (grid axes; 1 for a sampled one)."""
        return 1

    def to_ray(self) -> Any:
        """The parameter in Ray Tune's search-space API (random and grid search)."""
        raise NotImplementedError

    def suggest(self, trial, key: str) -> dict[str, Any]:
        """Ask an Optuna trial for the value at ``key``; return constants to add to the config."""
        raise NotImplementedError

    def probes(self, key: str) -> list[dict[str, Any]]:
        """Override sets at the parameter's extremes: each is validated as a trial config up front."""
        raise NotImplementedError

    def overrides(self, key: str, value: Any) -> dict[str, Any]:
        """A sampled ``value`` → trial-config overrides (dotted keys)."""
        return {key: value}

    def first(self, key: str, value: Any) -> dict[str, Any]:
        """A value the sweep runs first (``search.points_to_evaluate``) as the Optuna parameters to
        enqueue. ValueError when this parameter could not draw it."""
        low, high = getattr(self, "low", None), getattr(self, "high", None)
        if low is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{value!r} is not a number")
            if not low <= value <= high:
                raise ValueError(f"{value!r} is outside [{low}, {high}]")
            if isinstance(self, IntRange) and int(value) != value:
                raise ValueError(f"{value!r} is not an integer")
        elif hasattr(self, "values") and value not in self.values:
            raise ValueError(f"{value!r} is not one of {self.values}")
        return {key: value}


class Uniform(_Param, Range):
    """A float drawn uniformly from [low, high]."""

    type: Literal["uniform"]

    def to_ray(self) -> Any:
        from ray import tune

        return tune.uniform(self.low, self.high)

    def suggest(self, trial, key: str) -> dict[str, Any]:
        trial.suggest_float(key, self.low, self.high)
        return {}

    def probes(self, key: str) -> list[dict[str, Any]]:
        return [{key: self.low}, {key: self.high}]


class LogUniform(Uniform):
    """A float drawn log-uniformly from [low, high] (low > 0)."""

    type: Literal["loguniform"]  # type: ignore[assignment]

    @field_validator("low")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("loguniform needs low > 0")
        return v

    def to_ray(self) -> Any:
        from ray import tune

        return tune.loguniform(self.low, self.high)

    def suggest(self, trial, key: str) -> dict[str, Any]:
        trial.suggest_float(key, self.low, self.high, log=True)
        return {}


class IntRange(_Param):
    """An integer from [low, high], both included."""

    type: Literal["int"]
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def to_ray(self) -> Any:
        from ray import tune

        return tune.randint(self.low, self.high + 1)

    def suggest(self, trial, key: str) -> dict[str, Any]:
        trial.suggest_int(key, self.low, self.high)
        return {}

    def probes(self, key: str) -> list[dict[str, Any]]:
        return [{key: self.low}, {key: self.high}]


class Choice(_Param):
    """One of ``values``, chosen by the searcher."""

    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    def to_ray(self) -> Any:
        from ray import tune

        return tune.choice(self.values)

    def suggest(self, trial, key: str) -> dict[str, Any]:
        trial.suggest_categorical(key, self.values)
        return {}

    def probes(self, key: str) -> list[dict[str, Any]]:
        return [{key: v} for v in self.values]


class Grid(Choice):
    """Every one of ``values`` (a grid axis): only with ``search.algorithm: grid``."""

    type: Literal["grid"]  # type: ignore[assignment]
    enumerates: ClassVar[bool] = True

    @property
    def size(self) -> int:
        return len(self.values)

    def to_ray(self) -> Any:
        from ray import tune

        return tune.grid_search(self.values)

    def suggest(self, trial, key: str) -> dict[str, Any]:
        raise TypeError(f"{key}: a grid axis cannot be sampled (the sweep file check refuses this)")


_KIND = "kind"  # which branch a λ draw took: `fixed` or a schedule name
# random/grid search: the plain value each trial's function-drawn parameters (λ) come from
DRAW_SEED_KEY = "cxr.draw_seed"
_ABSENT = object()


class LambdaParam(_Param):
    """λ searched as a fixed value in a range *or* as one of the λ schedules, each with its
    parameters (a range or a constant each; the schedule's defaults for the rest).

    The file gives ``fixed: {low, high}`` and one key per schedule of :mod:`trainer.schedules`
    (``adaptive: {slope: {low, high}, floor: 0.2}``); ``null`` leaves a branch out. The paper's
    adaptive schedule is searched unless left out. With Optuna the space is conditional: the
    sampler first picks the branch, then only that branch's parameters.
    """

    type: Literal["lambda"]
    fixed: Range | None = Range(low=0.0, high=1.0)
    schedules: dict[str, dict[str, Range | float]] = Field(default_factory=lambda: {DEFAULT_SCHEDULE: {}})

    @model_validator(mode="before")
    @classmethod
    def _branches(cls, data: Any) -> Any:
        """``<schedule>: {...}`` keys of the file → ``schedules`` (a dumped spec has them there)."""
        if not isinstance(data, dict) or "schedules" in data:
            return data
        out = {k: data[k] for k in ("type", "fixed") if k in data}
        branches: dict[str, Any] = {DEFAULT_SCHEDULE: {}}
        for key, value in data.items():
            if key in out:
                continue
            if key not in schedule_names():
                valid = ", ".join([FIXED, *schedule_names()])
                raise ValueError(f"{key!r} is not a λ branch; valid: {valid} (each may be null)")
            if value is None:
                branches.pop(key, None)
            else:
                branches[key] = value
        out["schedules"] = branches
        return out

    @model_validator(mode="after")
    def _known_parameters(self):
        if self.fixed is None and not self.schedules:
            raise ValueError(f"give `fixed`, a schedule ({', '.join(schedule_names())}) or both")
        for name, ranges in self.schedules.items():
            takes = schedule_parameters(name)
            unknown = sorted(set(ranges) - set(takes))
            if unknown:
                raise ValueError(
                    f"{name}: no parameter {', '.join(unknown)} (it takes {', '.join(takes) or 'none'})"
                )
        return self

    @property
    def kinds(self) -> list[str]:
        return ([FIXED] if self.fixed is not None else []) + list(self.schedules)

    def _draw(self, kind: str, pick) -> dict[str, Any]:
        """One branch's parameters: ``pick(name, range, kind)`` for ranges, constants as given."""
        params = schedule_parameters(kind)
        return {
            n: pick(n, r, params[n].kind) if isinstance(r, Range) else r
            for n, r in self.schedules[kind].items()
        }

    def to_ray(self, key: str = "attention.lambda") -> Any:
        from ray import tune

        return tune.sample_from(SeededDraw(self, key))

    def _sample(self, rng) -> dict[str, Any]:
        kind = rng.choice(self.kinds)
        if kind == FIXED:
            return {_KIND: FIXED, "value": rng.uniform(self.fixed.low, self.fixed.high)}

        def pick(_n, r: Range, t: type):
            return rng.randint(int(r.low), int(r.high)) if t is int else rng.uniform(r.low, r.high)

        return {_KIND: kind, kind: self._draw(kind, pick)}

    def suggest(self, trial, key: str) -> dict[str, Any]:
        kind = trial.suggest_categorical(f"{key}/{_KIND}", self.kinds)
        if kind == FIXED:
            trial.suggest_float(f"{key}/value", self.fixed.low, self.fixed.high)
            return {}
        constants: dict[str, Any] = {}

        def pick(n: str, r: Range, t: type):
            name = f"{key}/{kind}/{n}"
            return (
                trial.suggest_int(name, int(r.low), int(r.high))
                if t is int
                else trial.suggest_float(name, r.low, r.high)
            )

        for n, v in self._draw(kind, pick).items():
            if not isinstance(self.schedules[kind][n], Range):
                constants[f"{key}/{kind}/{n}"] = v
        return constants

    def probes(self, key: str) -> list[dict[str, Any]]:
        draws = []
        if self.fixed is not None:
            draws += [{_KIND: FIXED, "value": v} for v in (self.fixed.low, self.fixed.high)]
        for kind in self.schedules:
            for end in ("low", "high"):
                draws.append(
                    {_KIND: kind, kind: self._draw(kind, lambda _n, r, t, end=end: t(getattr(r, end)))}
                )
        return [self.overrides(key, d) for d in draws]

    def first(self, key: str, value: Any) -> dict[str, Any]:
        """A number is a fixed λ (``1.0``: the cross-entropy baseline); a schedule's name runs that
        schedule, its searched parameters drawn."""
        if isinstance(value, str):
            if value not in self.schedules:
                raise ValueError(f"{value!r} is not a searched λ branch (searched: {', '.join(self.kinds)})")
            return {f"{key}/{_KIND}": value}
        if self.fixed is None:
            raise ValueError(
                f"a fixed λ ({value!r}), but only schedules are searched: {', '.join(self.kinds)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is neither a number nor a schedule name")
        if not self.fixed.low <= value <= self.fixed.high:
            raise ValueError(f"λ {value!r} is outside the searched [{self.fixed.low}, {self.fixed.high}]")
        return {f"{key}/{_KIND}": FIXED, f"{key}/value": float(value)}

    def overrides(self, key: str, value: Any) -> dict[str, Any]:
        """``{kind: fixed, value: v}`` → λ = v; ``{kind: name, name: {...}}`` → λ = name with those
        parameters, in the ``schedule`` field beside λ (``attention.schedule``)."""
        section = key.rpartition(".")[0]
        schedule_key = f"{section}.schedule" if section else "schedule"
        kind = value[_KIND]
        if kind == FIXED:
            return {key: value["value"], schedule_key: {}}
        return {key: kind, schedule_key: dict(value.get(kind) or {})}


Param = Annotated[Uniform | LogUniform | IntRange | Choice | Grid | LambdaParam, Field(discriminator="type")]


class SeededDraw:
    """λ's draw in Ray's random/grid search, a function of the trial's own seed (``DRAW_SEED_KEY``,
    a plain value Ray keeps with the trial). Ray draws a function-valued parameter again whenever it
    re-adds a trial, a restored one included (``_FunctionResolver``: "their random states are not
    restored"): a draw from the global RNG gave a resumed trial another λ than the one it trained
    and was logged with. Without a seed (``spec`` None) it draws from the global RNG."""

    def __init__(self, param: LambdaParam, key: str) -> None:
        self.param, self.key = param, key

    def __call__(self, spec: Any) -> dict[str, Any]:
        from ray.tune.search.sample import Domain
        from ray.tune.search.variant_generator import RecursiveDependencyError

        seed = dict.get(spec, DRAW_SEED_KEY) if isinstance(spec, dict) else None
        if isinstance(seed, Domain):  # not drawn yet: Ray resolves the seed, then calls again
            raise RecursiveDependencyError(f"{self.key} depends on {DRAW_SEED_KEY}")
        return self.param._sample(random if seed is None else random.Random(f"{seed}:{self.key}"))
