"""Search-space YAML → a validated :class:`SweepSpec` → Ray Tune param space / Optuna space.

A sweep file holds trial-config defaults (``trial:``), the searched parameters (``params:``,
dotted trial-config keys), the search algorithm, the scheduler, resources and tracking. It is
validated strictly (unknown keys are errors) and every searched value is checked against the
trial config *before* any trial starts. Optuna and Ray types stay in this module: trials receive
plain ``{dotted.key: value}`` overrides.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.config import ConfigError, TrialConfig, resolve_priors_file
from trainer.dotted import apply_overrides, format_validation_error, load_yaml_mapping, set_dotted

__all__ = [
    "SweepSpec",
    "load_sweep",
    "optuna_space",
    "overrides_from_params",
    "ray_param_space",
    "trial_config_for",
]

LAMBDA_KIND = "kind"  # sub-key of a `type: lambda` parameter: fixed | adaptive


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low <= self.high or math.isnan(self.low) or math.isnan(self.high):
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class Uniform(_Range):
    """A float drawn uniformly from [low, high]."""

    type: Literal["uniform"]


class LogUniform(_Range):
    """A float drawn log-uniformly from [low, high] (low > 0)."""

    type: Literal["loguniform"]

    @field_validator("low")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("loguniform needs low > 0")
        return v


class IntRange(_Strict):
    """An integer from [low, high], both included."""

    type: Literal["int"]
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class Choice(_Strict):
    """One of ``values``, chosen by the searcher."""

    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class Grid(_Strict):
    """Every one of ``values`` (a grid axis): only with ``search.algorithm: grid``."""

    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class _AdaptiveRanges(_Strict):
    slope: _Range | float = 0.023
    floor: _Range | float = 0.2


class LambdaParam(_Strict):
    """λ searched as fixed in a range *or* the adaptive schedule with its slope and floor."""

    type: Literal["lambda"]
    fixed: _Range | None = _Range(low=0.0, high=1.0)
    adaptive: _AdaptiveRanges | None = _AdaptiveRanges()

    @model_validator(mode="after")
    def _one_branch(self):
        if self.fixed is None and self.adaptive is None:
            raise ValueError("give `fixed`, `adaptive` or both")
        return self

    @property
    def kinds(self) -> list[str]:
        return [k for k in ("fixed", "adaptive") if getattr(self, k) is not None]


Param = Annotated[Uniform | LogUniform | IntRange | Choice | Grid | LambdaParam, Field(discriminator="type")]


class SearchConfig(_Strict):
    algorithm: Literal["optuna", "random", "grid"] = Field(
        "optuna", description="optuna: TPE via Ray's OptunaSearch; random; grid: every grid value."
    )
    seed: int | None = Field(0, description="Searcher seed (reproducible suggestions).")


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: early-stop weak trials; fifo: none.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor per rung.")
    max_t: int | None = Field(None, ge=1, description="ASHA: max epochs (default: trial train.epochs).")


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial.")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; fractional (e.g. 0.5) packs trials.")

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"more than one GPU must be a whole number, got {v}")
        return v


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="Tracking server; default $MLFLOW_TRACKING_URI, else a sqlite file in storage."
    )
    experiment: str | None = Field(None, description="Experiment name (default: the sweep name).")


class SweepSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Sweep name.")
    description: str = ""
    trial: dict[str, Any] = Field(description="Trial-config defaults (see configs/trial.yaml).")
    params: dict[str, Param] = Field(default_factory=dict, description="Searched dotted trial keys.")
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    num_samples: int = Field(8, ge=1, description="Trials (grid: repeats of the whole grid).")
    resources: Resources = Resources()
    max_concurrent_trials: int | None = Field(None, ge=1, description="Cap on trials running at once.")
    metric: str = Field("val_f1_macro", description="Validation metric the searcher and ASHA optimise.")
    mode: Literal["max", "min"] = "max"
    storage_path: str = Field("sweeps", description="Local directory or s3:// URI for Ray's results.")
    max_failures: int = Field(2, ge=0, description="Retries of a failed trial, from its last checkpoint.")
    reuse_actors: bool = Field(
        True, description="Run the next trial in the finished trial's worker process (saves its start-up)."
    )
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        if not v.startswith("val_"):
            raise ValueError(f"metric must be a validation metric (val_*), got {v!r}: never select on test")
        return v

    @model_validator(mode="after")
    def _grid_only_with_grid_search(self):
        grid = sorted(k for k, p in self.params.items() if isinstance(p, Grid))
        if grid and self.search.algorithm != "grid":
            raise ValueError(
                f"params {grid} use `type: grid`, which enumerates every value, but search.algorithm is "
                f"{self.search.algorithm!r}, which samples. Either set `search.algorithm: grid` to run the "
                "full grid, or change them to `type: choice` so the searcher picks among the values."
            )
        if self.search.algorithm == "grid" and not grid:
            raise ValueError("search.algorithm is 'grid' but no param has `type: grid`")
        return self

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params.values() if isinstance(p, Grid))

    @property
    def total_trials(self) -> int:
        return self.num_samples * (self.grid_size if self.search.algorithm == "grid" else 1)


# ---- loading ------------------------------------------------------------------------------------
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, TrialConfig]:
    """Load and fully validate a sweep file; return the spec and the resolved base trial config.

    ``overrides`` are ``key.sub=value`` strings applied to the file before validation (e.g.
    ``trial.train.epochs=1``). Relative paths (trial data/output, storage) resolve against the
    YAML file's folder.
    """
    path = Path(path)
    raw = load_yaml_mapping(path, "sweep file")
    _apply_sweep_overrides(raw, overrides or [])
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), "sweep file")) from None
    base = path.parent.resolve()
    storage = spec.storage_path
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str((base / storage).resolve())
    trial = copy.deepcopy(spec.trial)
    resolve_priors_file(trial, base)
    trial.setdefault("name", spec.name)
    trial.setdefault(
        "output_dir", str(Path(storage) / spec.name / "_base") if "://" not in storage else "runs"
    )
    spec = spec.model_copy(update={"storage_path": storage, "trial": trial})
    base_cfg = _validate_trial(trial, {}, str(path), "trial").resolve_paths(base=base)
    spec = spec.model_copy(update={"trial": base_cfg.to_dict()})
    for key, p in spec.params.items():
        for probe in _probes(key, p):
            _validate_trial(spec.trial, probe, str(path), f"params.{key}")
    return spec, base_cfg


def _apply_sweep_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """``key.sub=value`` overrides; ``params.<dotted.name>.<field>=value`` reaches into a parameter."""
    plain = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith("params.") and sep and key.count(".") >= 2:
            name, _, field = key.removeprefix("params.").rpartition(".")
            params = raw.setdefault("params", {})
            if name not in params:
                raise ConfigError(f"override {item!r}: no searched parameter {name!r}; have {sorted(params)}")
            params[name][field] = yaml.safe_load(value)
        else:
            plain.append(item)
    apply_overrides(raw, plain)


def _probes(key: str, p: Param) -> list[dict[str, Any]]:
    """Override sets that exercise a parameter's extremes (each validated as a trial config)."""
    if isinstance(p, Uniform | LogUniform | IntRange):
        return [{key: p.low}, {key: p.high}]
    if isinstance(p, Choice | Grid):
        return [{key: v} for v in p.values]
    out = []
    kind = f"{key}.{LAMBDA_KIND}"
    if p.fixed is not None:
        out += [overrides_from_params({kind: "fixed", key: v}) for v in (p.fixed.low, p.fixed.high)]
    if p.adaptive is not None:
        ranges = {"slope": p.adaptive.slope, "floor": p.adaptive.floor}
        for end in ("low", "high"):
            vals = {f"{key}.{n}": getattr(r, end) if isinstance(r, _Range) else r for n, r in ranges.items()}
            out.append(overrides_from_params({kind: "adaptive", **vals}))
    return out


def _validate_trial(trial: dict[str, Any], overrides: dict[str, Any], source: str, where: str) -> TrialConfig:
    raw = copy.deepcopy(trial)
    try:
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return TrialConfig.from_dict(raw, source=f"{source}: {where}{_describe(overrides)}")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {where}: {e}") from None


def _describe(overrides: dict[str, Any]) -> str:
    return f" (with {', '.join(f'{k}={v!r}' for k, v in overrides.items())})" if overrides else ""


def overrides_from_params(flat: dict[str, Any]) -> dict[str, Any]:
    """Searcher output → trial-config overrides (expands the λ fixed/adaptive branch)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.endswith(f".{LAMBDA_KIND}"):
            continue
        out[key] = value
    for key in [k for k in flat if k.endswith(f".{LAMBDA_KIND}")]:
        lam_key = key.removesuffix(f".{LAMBDA_KIND}")  # e.g. attention.lambda
        section = lam_key.rpartition(".")[0]  # attention
        if flat[key] == "adaptive":
            out[lam_key] = "adaptive"
            for n in ("slope", "floor"):
                if f"{lam_key}.{n}" in flat:
                    out[f"{section}.{n}"] = out.pop(f"{lam_key}.{n}")
    return out


def trial_config_for(spec: SweepSpec, flat_params: dict[str, Any], name: str, output_dir: str) -> TrialConfig:
    """The full trial config of one suggestion."""
    raw = copy.deepcopy(spec.trial)
    raw["name"], raw["output_dir"] = name, output_dir
    for key, value in overrides_from_params(flat_params).items():
        set_dotted(raw, key, value)
    return TrialConfig.from_dict(raw, source=f"sweep {spec.name}")


# ---- Ray / Optuna spaces ----------------------------------------------------------------------------
def ray_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Param space for Ray's random/grid search (``BasicVariantGenerator``); keys are dotted."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, p in spec.params.items():
        if isinstance(p, Uniform):
            space[key] = tune.uniform(p.low, p.high)
        elif isinstance(p, LogUniform):
            space[key] = tune.loguniform(p.low, p.high)
        elif isinstance(p, IntRange):
            space[key] = tune.randint(p.low, p.high + 1)
        elif isinstance(p, Choice):
            space[key] = tune.choice(p.values)
        elif isinstance(p, Grid):
            space[key] = tune.grid_search(p.values)
        else:
            space[key] = tune.sample_from(lambda _, p=p: _sample_lambda(p))
    return space


def _sample_lambda(p: LambdaParam) -> dict[str, Any]:
    import random

    kind = random.choice(p.kinds)
    if kind == "fixed":
        return {LAMBDA_KIND: "fixed", "value": random.uniform(p.fixed.low, p.fixed.high)}
    a = p.adaptive
    draw = lambda r: random.uniform(r.low, r.high) if isinstance(r, _Range) else r  # noqa: E731
    return {LAMBDA_KIND: "adaptive", "slope": draw(a.slope), "floor": draw(a.floor)}


def flatten_ray_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's sampled config (λ as a nested dict) → the flat form :func:`overrides_from_params` takes."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and LAMBDA_KIND in value:
            flat[f"{key}.{LAMBDA_KIND}"] = value[LAMBDA_KIND]
            if value[LAMBDA_KIND] == "fixed":
                flat[key] = value["value"]
            else:
                flat[f"{key}.slope"], flat[f"{key}.floor"] = value["slope"], value["floor"]
        else:
            flat[key] = value
    return flat


def optuna_space(spec: SweepSpec) -> OptunaSpace:
    """A define-by-run space for Ray's ``OptunaSearch``: conditional λ branches included."""
    return OptunaSpace(dict(spec.params))


class OptunaSpace:
    """Picklable define-by-run function (Ray checkpoints the searcher with the space in it)."""

    def __init__(self, params: dict[str, Param]) -> None:
        self.params = params

    def __call__(self, trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        for key, p in self.params.items():
            if isinstance(p, Uniform):
                trial.suggest_float(key, p.low, p.high)
            elif isinstance(p, LogUniform):
                trial.suggest_float(key, p.low, p.high, log=True)
            elif isinstance(p, IntRange):
                trial.suggest_int(key, p.low, p.high)
            elif isinstance(p, Choice):
                trial.suggest_categorical(key, p.values)
            elif isinstance(p, LambdaParam):
                kind = trial.suggest_categorical(f"{key}.{LAMBDA_KIND}", p.kinds)
                if kind == "fixed":
                    trial.suggest_float(key, p.fixed.low, p.fixed.high)
                    continue
                for n in ("slope", "floor"):
                    r = getattr(p.adaptive, n)
                    if isinstance(r, _Range):
                        trial.suggest_float(f"{key}.{n}", r.low, r.high)
                    else:
                        constants[f"{key}.{n}"] = r
        return constants
