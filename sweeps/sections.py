"""The fixed sections of a sweep file: ``search``, ``scheduler``, ``resources`` and ``mlflow``
(strict: an unknown key is an error). :class:`sweeps.space.SweepSpec` holds them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MlflowConfig", "Resources", "SchedulerConfig", "SearchConfig", "Strict"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchConfig(Strict):
    algorithm: Literal["optuna", "random", "grid"] = Field(
        "optuna", description="optuna: TPE via Ray's OptunaSearch; random; grid: every grid value."
    )
    seed: int | None = Field(0, description="Searcher seed (reproducible suggestions).")
    sampler: Literal["tpe", "nsga2"] = Field(
        "tpe",
        description="Optuna's sampler: tpe (multi-objective TPE for several metrics) or nsga2 (NSGA-II).",
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trials to run first, each a mapping of searched keys to values; what a point leaves "
        "out is drawn. E.g. [{attention.lambda: 1.0}]: the cross-entropy baseline. They count in "
        "num_samples. Random search with points runs on Optuna's RandomSampler (Ray's variant "
        "generator cannot preset the λ parameter).",
    )
    warm_start: str | None = Field(
        None,
        description="An earlier sweep (by name, in this sweep's MLflow store) whose finished configurations "
        "and validation scores seed the Optuna searcher before the first trial: TPE starts from what it "
        "learnt. Needs algorithm optuna.",
    )


class SchedulerConfig(Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: early-stop weak trials; fifo: none.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor per rung.")
    max_t: int | None = Field(None, ge=1, description="ASHA: max epochs (default: trial train.epochs).")
    metric: Literal["first"] | None = Field(
        None, description="A multi-objective sweep with ASHA: `first` stops trials on the first metric alone."
    )


class Resources(Strict):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial.")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; fractional (e.g. 0.5) packs trials.")

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"more than one GPU must be a whole number, got {v}")
        return v


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(
        None, description="Tracking server; default $MLFLOW_TRACKING_URI, else a sqlite file in storage."
    )
    experiment: str | None = Field(None, description="Experiment name (default: the sweep name).")
