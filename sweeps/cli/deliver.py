"""After choosing a configuration: ``export`` its model, ``predict`` with the export, and ``ui``
(the MLflow UI on the sweep's store, with its views). Usage: docs/results-cli.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, fail, user_errors
from .options import RESULT_ERRORS, MetricOpt, StorageOpt, UriOpt

__all__ = ["register"]


# ---- export -------------------------------------------------------------------------------------------
def export(
    source: Annotated[
        str, typer.Argument(help="A sweep name (its best run on validation) or an MLflow run id.")
    ],
    format_: Annotated[
        str, typer.Option("--format", help="Comma-separated: torchscript, onnx.")
    ] = "torchscript,onnx",
    out: Annotated[
        Path | None, typer.Option(help="Export folder (default: ./export-<run id prefix>).")
    ] = None,
    storage: StorageOpt = None,
    tracking_uri: UriOpt = None,
    metric: MetricOpt = None,
    atol: Annotated[float, typer.Option(help="Largest allowed |logit difference| to PyTorch.")] = 1e-4,
    register: Annotated[bool, typer.Option(help="Register the model in the MLflow Model Registry.")] = True,
    name: Annotated[str | None, typer.Option(help="Registered model name (default: cxr-<sweep>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
) -> None:
    """Export the best (or a given) run's model to TorchScript/ONNX, with a model card, and register it."""
    from ..results.export import export_model, parse_formats

    with user_errors(*RESULT_ERRORS):
        result = export_model(
            source,
            parse_formats(format_),
            out,
            storage=storage,
            tracking_uri=tracking_uri,
            metric=metric,
            atol=atol,
            register=register,
            registered_name=name,
            overwrite=overwrite,
        )
    console.print(
        f"run {result.run.run_id} ({result.run.run_name}) of sweep {result.run.sweep!r}", markup=False
    )
    if result.configuration is not None:
        cfg = result.configuration
        console.print(
            f"the best of {cfg.tags.get('cxr.repeats', '?')} seeds (on validation) of configuration run "
            f"{cfg.run_id} ({cfg.run_name}), ranked on their mean",
            markup=False,
        )
    for fmt, path in result.files.items():
        diff = result.max_abs_diff.get(fmt)
        console.print(f"{fmt}: {path}" + (f"  (max |Δlogit| {diff:.2e})" if diff is not None else ""))
    if result.registered:
        console.print(f"registered: models:/{result.registered[0]}/{result.registered[1]}")


# ---- predict ------------------------------------------------------------------------------------------
def predict(
    model: Annotated[Path, typer.Option(help="Export folder, its model.torchscript.pt, or its model.onnx.")],
    images: Annotated[Path, typer.Option(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output folder: predictions.csv, cams.npz, cam/*.png.")] = Path(
        "predictions"
    ),
    runtime: Annotated[str, typer.Option(help="auto | torchscript | onnx (probabilities).")] = "auto",
    cam: Annotated[bool, typer.Option(help="Grad-CAM overlays (need the TorchScript file).")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Run an exported model on images: probabilities (CSV) and Grad-CAM overlay PNGs."""
    from ..results.predict import predict_folder

    with user_errors(*RESULT_ERRORS):
        result = predict_folder(
            model, images, out, runtime=runtime, cam=cam, batch_size=batch_size, overwrite=overwrite
        )
    console.print(f"{len(result.names)} images, probabilities from {result.runtime}: {result.csv}")
    if result.overlays:
        console.print(f"Grad-CAM overlays: {result.out_dir / 'cam'} ({len(result.overlays)} PNGs)")


# ---- ui -----------------------------------------------------------------------------------------------
def ui(
    sweep: Annotated[str | None, typer.Argument(help="Sweep name: open its runs directly.")] = None,
    storage: StorageOpt = None,
    tracking_uri: UriOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 5000,
) -> None:
    """Start the MLflow UI on the sweep's tracking store (127.0.0.1 only) and print its URLs: the
    trials best first with their λ, mode, searched values, F1, YI and DP; the top runs compared."""
    from mlflow.tracking import MlflowClient

    from ..results.ui import experiment_url, start_ui, stop_ui
    from ..tracking.lookup import open_store, sweep_experiment

    with user_errors(*RESULT_ERRORS):
        uri = open_store(sweep, storage, tracking_uri)
        exp_id = None
        if sweep is not None:
            name = sweep_experiment(sweep, storage) or sweep
            exp = MlflowClient(uri).get_experiment_by_name(name)
            if exp is None:
                raise fail(f"unknown sweep {sweep!r}: no MLflow experiment {name!r} in {uri}")
            exp_id = exp.experiment_id
        proc, base = start_ui(uri, port=port)
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too (finally below)
    try:
        console.print(f"MLflow UI on {uri}")
        views = _sweep_views(uri, base, sweep, storage, exp_id) if sweep is not None else None
        if views is None:
            console.print(f"open {experiment_url(base, exp_id)}  (Ctrl-C stops it)", soft_wrap=True)
        else:
            console.print(f"open {views.trials}  (Ctrl-C stops it)", soft_wrap=True)
            console.print("  the trials best first: λ, mode, searched values, test F1, YI, DP")
            console.print(f"parallel coordinates: {views.charts}", soft_wrap=True)
            if views.compare:
                console.print(f"compare the top runs: {views.compare}", soft_wrap=True)
            console.print(f"every run (parent, trials): {views.runs}", soft_wrap=True)
    except BaseException:
        stop_ui(proc)
        raise
    console.file.flush()  # the URL must reach a pipe (scripts, tests) before the wait
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(proc)


def _sweep_views(uri: str, base: str, sweep: str, storage, exp_id: str):
    """The sweep's UI views, or None when it has no finished trial run yet (the plain runs page)."""
    from mlflow.tracking import MlflowClient

    from trainer.metrics import higher_is_better

    from ..results.select import metric_key, rank_runs
    from ..results.ui import sweep_views
    from ..tracking.lookup import SelectionError, find_runs

    try:
        found = find_runs([sweep], storage=storage, tracking_uri=uri)
        ranked = rank_runs(found.runs, found.default_metric)
    except SelectionError:
        return None
    if not ranked:
        return None
    key = metric_key(found.default_metric)
    mode = "max" if higher_is_better(key) else "min"
    searched = sorted({f"search.{k}" for r in ranked for k in r.searched})
    top = [r.run_id for r in ranked[:5]]
    return sweep_views(MlflowClient(uri), base, exp_id, sweep, key, mode, top, searched)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    for fn in (export, predict, ui):
        app.command(fn.__name__)(fn)
