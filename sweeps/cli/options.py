"""Options the results commands share: which sweep, which store, which runs, which metric."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "RESULT_ERRORS",
    "ExperimentOpt",
    "FilterOpt",
    "MetricOpt",
    "StoppedOpt",
    "StorageOpt",
    "SweepsOpt",
    "UriOpt",
]

SweepsOpt = Annotated[
    list[str] | None, typer.Argument(help="Sweep name(s): each sweep's latest parent run and its trials.")
]
StorageOpt = Annotated[Path | None, typer.Option(help="The sweep's storage_path (finds its MLflow store).")]
UriOpt = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: from --storage, $MLFLOW_TRACKING_URI, ./mlflow.db)."),
]
ExperimentOpt = Annotated[
    list[str] | None, typer.Option("--experiment", help="Also every trial run of this MLflow experiment.")
]
FilterOpt = Annotated[
    str | None,
    typer.Option(
        "--filter", help="MLflow filter on the runs, e.g. \"params.`model.backbone` = 'resnet50'\"."
    ),
]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        help="Validation metric that ranks runs (f1_macro, val_auc, ...; default: the sweep's metric)."
    ),
]
StoppedOpt = Annotated[
    bool, typer.Option(help="Rank runs ASHA stopped early too (they have no test metrics).")
]


RESULT_ERRORS = (ValueError, FileNotFoundError)  # a bad metric name or filter, a missing file
