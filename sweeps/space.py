"""Search-space YAML → a validated :class:`SweepSpec` → Ray Tune param space / Optuna space.

A sweep file holds trial-config defaults (``trial:``), the searched parameters (``params:``,
dotted trial-config keys, typed by :mod:`sweeps.params`), the search algorithm, the scheduler,
resources and tracking. It is validated strictly (unknown keys are errors) and every searched
value is checked against the trial config *before* any trial starts. Optuna and Ray types stay in
this layer: a trial receives plain ``{dotted.key: value}`` overrides (:func:`trial_overrides`).

The resolved spec is saved beside Ray's experiment state (:data:`SPEC_FILE`), so ``resume``,
``status`` and the results commands find a sweep by name and storage folder.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from trainer.config import AttentionConfig, TrialConfig, resolve_priors_file
from trainer.dotted import flatten, format_validation_error, load_yaml_mapping, set_dotted
from trainer.errors import ConfigError, UserError
from trainer.metrics.names import check_metric, higher_is_better, logged_names

from .checks import apply_sweep_overrides, one_selection_metric, settings_used_by_the_modes, validate_trial
from .params import DRAW_SEED_KEY, LambdaParam, Param
from .sections import MlflowConfig, Resources, SchedulerConfig, SearchConfig, Strict

__all__ = [
    "FINAL_KEY",
    "SPEC_FILE",
    "SweepSpec",
    "load_saved_spec",
    "load_sweep",
    "optuna_space",
    "ray_param_space",
    "save_spec",
    "searched_values",
    "sweep_dir",
    "trial_config_for",
    "trial_overrides",
]

SPEC_FILE = "cxr_sweep.json"  # the resolved sweep, saved beside Ray's experiment state
FINAL_KEY = "trial_done"  # set on a trial's last report, which carries its best_val_* and test_* summaries


class SweepSpec(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Sweep name.")
    description: str = ""
    trial: dict[str, Any] = Field(description="Trial-config defaults (see configs/trial.yaml).")
    params: dict[str, Param] = Field(default_factory=dict, description="Searched dotted trial keys.")
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    num_samples: int = Field(8, ge=1, description="Trials (grid: repeats of the whole grid).")
    repeats: int = Field(
        1,
        ge=1,
        le=100,
        description="Seeds per configuration: each trial trains train.seed, +1, … in lockstep and reports "
        "their mean per epoch, so the searcher and ASHA see one value per configuration.",
    )
    resources: Resources = Resources()
    max_concurrent_trials: int | None = Field(None, ge=1, description="Cap on trials running at once.")
    metric: str = Field(
        "val_f1_macro",
        description="Validation metric the searcher and ASHA optimise; also each trial's selection metric. "
        "A list ([val_f1_macro, val_pointing_game]) makes a multi-objective sweep: the searcher optimises "
        "all of them, the first is each trial's selection metric (and ASHA's, with scheduler.metric: first).",
    )
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Its direction (a list for a list of metrics); left out, it follows the metric (and must "
        "agree with it).",
    )
    objectives: list[str] = Field(
        default_factory=list, description="Set from a list `metric`: every objective, the first is `metric`."
    )
    modes: list[Literal["max", "min"]] = Field(
        default_factory=list, description="The objectives' directions."
    )
    storage_path: str = Field("sweeps", description="Local directory or s3:// URI for Ray's results.")
    max_failures: int = Field(2, ge=0, description="Retries of a failed trial, from its last checkpoint.")
    reuse_actors: bool = Field(
        True, description="Run the next trial in the finished trial's worker process (saves its start-up)."
    )
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="before")
    @classmethod
    def _mode_follows_the_metric(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        metric = data.get("metric", "val_f1_macro")
        if isinstance(metric, list):  # several objectives: the first is the metric, with its mode
            if not metric or not all(isinstance(m, str) for m in metric):
                raise ValueError(
                    "metric: a list of validation metric names, e.g. [val_f1_macro, val_pointing_game]"
                )
            mode = data.get("mode")
            if isinstance(mode, list) and len(mode) != len(metric):
                raise ValueError(f"mode: {len(mode)} directions for {len(metric)} metrics")
            if mode is not None and not isinstance(mode, list):
                raise ValueError("mode: with a list of metrics give a list of directions, or leave it out")
            data["metric"], data["objectives"] = metric[0], list(metric) if len(metric) > 1 else []
            data["mode"] = mode[0] if mode else None
            if len(metric) > 1:
                data["modes"] = list(mode) if mode else [_direction(m) for m in metric]
        if data.get("mode") is None:
            data["mode"] = _direction(data.get("metric", "val_f1_macro"))
        return data

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        return _check_validation_metric(v)

    @model_validator(mode="after")
    def _objectives_are_validation_scores(self):
        if not self.objectives:
            return self
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"metric: {self.objectives} names a metric twice")
        for name, mode in zip(self.objectives, self.modes, strict=True):
            _check_validation_metric(name)
            want = "max" if higher_is_better(name) else "min"
            if mode != want:
                raise ValueError(f"mode: {mode!r} contradicts metric {name!r}: leave mode out or set {want}")
        if self.scheduler.type == "asha" and self.scheduler.metric != "first":
            raise ValueError(
                f"scheduler: ASHA stops trials on one metric, and this sweep has {len(self.objectives)} "
                f"({', '.join(self.objectives)}). Use scheduler: {{type: fifo}} (every trial runs its "
                f"epochs), or scheduler.metric: first to stop weak trials on {self.objectives[0]} alone"
            )
        return self

    @property
    def all_metrics(self) -> list[str]:
        """Every objective of the sweep (one for a single-objective sweep), the first is ``metric``."""
        return list(self.objectives) or [self.metric]

    @property
    def all_modes(self) -> list[str]:
        return list(self.modes) or [self.mode]

    @model_validator(mode="after")
    def _mode_agrees_with_the_metric(self):
        want = "max" if higher_is_better(self.metric) else "min"
        if self.mode != want:
            better = "higher" if want == "max" else "lower"
            raise ValueError(
                f"mode: {self.mode!r} contradicts metric {self.metric!r} ({better} is better): "
                f"leave mode out (it follows the metric) or set mode: {want}"
            )
        return self

    @model_validator(mode="after")
    def _grid_only_with_grid_search(self):
        grid = sorted(k for k, p in self.params.items() if p.enumerates)
        if grid and self.search.algorithm != "grid":
            raise ValueError(
                f"params {grid} use `type: grid`, which enumerates every value, but search.algorithm is "
                f"{self.search.algorithm!r}, which samples. Either set `search.algorithm: grid` to run the "
                "full grid, or change them to `type: choice` so the searcher picks among the values."
            )
        if self.search.algorithm == "grid" and not grid:
            raise ValueError("search.algorithm is 'grid' but no param has `type: grid`")
        return self

    @model_validator(mode="after")
    def _points_to_evaluate_are_in_the_space(self):
        points = self.search.points_to_evaluate
        if points and self.search.algorithm == "grid":
            raise ValueError(
                "search.points_to_evaluate: a grid runs every grid value; give it with optuna or random"
            )
        if len(points) > self.num_samples:
            raise ValueError(
                f"search.points_to_evaluate: {len(points)} points but num_samples is {self.num_samples} "
                "(the points are among the trials)"
            )
        for i, point in enumerate(points):
            for key, value in point.items():
                where = f"search.points_to_evaluate[{i}].{key}"
                if key not in self.params:
                    raise ValueError(f"{where}: not a searched key (params: {', '.join(self.params)})")
                try:
                    self.params[key].first(key, value)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
        return self

    @model_validator(mode="after")
    def _warm_start_needs_a_model(self):
        if self.search.warm_start and self.search.algorithm != "optuna":
            raise ValueError(
                f"search.warm_start: {self.search.algorithm} search draws without a model of earlier "
                "results, so a warm start would change nothing; use algorithm: optuna"
            )
        return self

    @model_validator(mode="after")
    def _repeats_own_the_seed(self):
        if self.repeats > 1 and "train.seed" in self.params:
            raise ValueError(
                f"params.train.seed: with repeats: {self.repeats} every configuration trains seeds "
                "train.seed, +1, …; search the seed or repeat it, not both"
            )
        return self

    def first_points(self) -> list[dict[str, Any]]:
        """``search.points_to_evaluate`` as Optuna parameters, for ``OptunaSearch`` to enqueue."""
        points = []
        for point in self.search.points_to_evaluate:
            names: dict[str, Any] = {}
            for key, value in point.items():
                names.update(self.params[key].first(key, value))
            points.append(names)
        return points

    @model_validator(mode="after")
    def _conditions_name_earlier_choices(self):
        keys = list(self.params)
        for i, (key, p) in enumerate(self.params.items()):
            for other, values in (p.when or {}).items():
                q = self.params.get(other)
                if other not in keys[:i] or not hasattr(q, "values"):
                    raise ValueError(
                        f"params.{key}.when: {other!r} must be a choice or grid parameter listed before it"
                    )
                if bad := [v for v in values if v not in q.values]:
                    raise ValueError(f"params.{key}.when: {other} never takes {bad} (its values: {q.values})")
        return self

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def remote_storage(self) -> bool:
        """``storage_path`` is a URI (``s3://...``), not a local or mounted folder."""
        return "://" in self.storage_path

    @property
    def grid_size(self) -> int:
        return math.prod(p.size for p in self.params.values())

    @property
    def total_trials(self) -> int:
        return self.num_samples * (self.grid_size if self.search.algorithm == "grid" else 1)


def _check_validation_metric(v: str) -> str:
    if not v.startswith("val_"):
        raise ValueError(f"metric must be a validation metric (val_*), got {v!r}: never select on test")
    check_metric(v, logged_names("val_"), "a validation metric a trial logs")
    higher_is_better(v)  # a score: it has a direction
    return v


def _direction(metric: Any) -> str:
    try:
        return "max" if higher_is_better(metric) else "min"
    except (UserError, TypeError):
        return "max"  # the metric's own check says what is wrong with it


def sweep_dir(spec: SweepSpec) -> str:
    """The sweep's folder in its storage: Ray's experiment state, trials and :data:`SPEC_FILE`."""
    return f"{spec.storage_path.rstrip('/')}/{spec.name}"


# ---- loading ------------------------------------------------------------------------------------
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, TrialConfig]:
    """Load and fully validate a sweep file; return the spec and the resolved base trial config.

    ``overrides`` are ``key.sub=value`` strings applied to the file before validation (e.g.
    ``trial.train.epochs=1``). Relative paths (trial data/output, storage) resolve against the
    YAML file's folder.
    """
    path = Path(path)
    raw = load_yaml_mapping(path, "sweep file")
    apply_sweep_overrides(raw, overrides or [])
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), "sweep file")) from None
    base = path.parent.resolve()
    storage = spec.storage_path
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str((base / storage).resolve())
    trial = copy.deepcopy(spec.trial)
    one_selection_metric(trial, spec.metric, str(path))
    resolve_priors_file(trial, base)
    trial.setdefault("name", spec.name)
    trial.setdefault(
        "output_dir", str(Path(storage) / spec.name / "_base") if "://" not in storage else "runs"
    )
    spec = spec.model_copy(update={"storage_path": storage, "trial": trial})
    base_cfg = validate_trial(trial, {}, str(path), "trial").resolve_paths(base=base)
    spec = spec.model_copy(update={"trial": base_cfg.to_dict()})
    for key, p in spec.params.items():
        for probe in p.probes(key):
            validate_trial(spec.trial, probe, str(path), f"params.{key}")
    settings_used_by_the_modes(spec, base_cfg, str(path))
    return spec, base_cfg


# ---- a trial of the sweep -----------------------------------------------------------------------
def trial_overrides(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """A Ray trial's sampled ``config`` → trial-config overrides, by each parameter's own rule.

    The one conversion the trainable, the MLflow callback and ``status`` use. Keys a config does
    not hold (a trial that never started) are left out.
    """
    out: dict[str, Any] = {}
    for key, p in spec.params.items():
        if key in config and p.applies(config):  # random search draws a conditional one anyway
            out.update(p.overrides(key, config[key]))
    return out


def searched_values(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """:func:`trial_overrides` as flat dotted keys: what tables and MLflow show as searched.

    Values that take no effect in the trial are left out (a threshold beside λ = 1 or mode energy:
    :meth:`trainer.config.AttentionConfig.inactive`), as its MLflow params leave them out."""
    overrides = trial_overrides(spec, config)
    flat = flatten(overrides)
    unused = {f"attention.{k}" for k in _inactive_attention(spec, overrides)}
    return {k: v for k, v in flat.items() if k not in unused}


def _inactive_attention(spec: SweepSpec, overrides: dict[str, Any]) -> set[str]:
    att = {
        k: v for k, v in (spec.trial.get("attention") or {}).items() if k in ("lambda", "schedule", "mode")
    }
    for key in ("lambda", "schedule", "mode"):
        if f"attention.{key}" in overrides:
            att[key] = overrides[f"attention.{key}"]
    try:
        return AttentionConfig.model_validate(att).inactive()
    except (ValidationError, UserError):
        return set()  # the trial's own config check reports it


def trial_config_for(spec: SweepSpec, config: dict[str, Any], name: str, output_dir: str) -> TrialConfig:
    """The full trial config of one sampled ``config``."""
    raw = copy.deepcopy(spec.trial)
    raw["name"], raw["output_dir"] = name, output_dir
    for key, value in trial_overrides(spec, config).items():
        set_dotted(raw, key, value)
    return TrialConfig.from_dict(raw, source=f"sweep {spec.name}")


# ---- Ray / Optuna spaces ------------------------------------------------------------------------
def ray_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Param space for Ray's random/grid search (``BasicVariantGenerator``); keys are dotted. λ's
    draw is a function of a per-trial seed (:class:`~sweeps.params.SeededDraw`): a restored trial
    gets the same λ back."""
    from ray import tune

    space = {
        key: p.to_ray(key) if isinstance(p, LambdaParam) else p.to_ray() for key, p in spec.params.items()
    }
    if any(isinstance(p, LambdaParam) for p in spec.params.values()):
        space[DRAW_SEED_KEY] = tune.randint(0, 2**31 - 1)
    return space


def optuna_space(spec: SweepSpec) -> OptunaSpace:
    """A define-by-run space for Ray's ``OptunaSearch``: conditional parameters included."""
    return OptunaSpace(dict(spec.params))


class OptunaSpace:
    """Picklable define-by-run function (Ray checkpoints the searcher with the space in it)."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def __call__(self, trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        for key, p in self.params.items():
            if p.applies(trial.params):  # a condition reads values suggested before it
                constants.update(p.suggest(trial, key))
        return constants


# ---- the saved spec -------------------------------------------------------------------------------
def save_spec(spec: SweepSpec, space_file: str | None) -> None:
    """Write the resolved spec into the sweep's folder (local storage only)."""
    if spec.remote_storage:
        return
    folder = Path(sweep_dir(spec))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(
        json.dumps({"spec": spec.model_dump(), "space_file": space_file}, indent=2)
    )


def load_saved_spec(name_or_path: str, storage: str | Path | None = None) -> tuple[SweepSpec, str | None]:
    """The spec a sweep ran with (and its space file), by name in ``storage`` or by folder."""
    candidates = [Path(name_or_path)]
    if storage is not None:
        candidates.insert(0, Path(storage) / name_or_path)
    for d in candidates:
        f = d / SPEC_FILE
        if f.is_file():
            saved = json.loads(f.read_text())
            return SweepSpec.model_validate(saved["spec"]), saved.get("space_file")
    where = ", ".join(str(c) for c in candidates)
    if storage is None:
        raise ConfigError(
            f"no sweep {name_or_path!r} found (looked for {SPEC_FILE} in {where}); "
            "pass --storage DIR (the sweep's storage_path)"
        )
    there = sorted(p.parent.name for p in Path(storage).glob(f"*/{SPEC_FILE}"))
    near = difflib.get_close_matches(name_or_path, there, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    hint = hint or (f"; sweeps there: {', '.join(there)}" if there else "")
    raise ConfigError(f"no sweep {name_or_path!r} in {storage} (no {SPEC_FILE} in {where}){hint}")
