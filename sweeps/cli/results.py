"""What users do after a sweep: ``best``, ``report``, ``export``, ``predict`` and ``ui``.

Every command finds a sweep the way ``cxr-sweep sweep status`` does: a sweep name with
``--storage`` (its saved spec says where its MLflow store is), or ``--tracking-uri`` /
``$MLFLOW_TRACKING_URI`` with the sweep name as the experiment. Usage: docs/results-cli.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import TableColumn, console, err_console, fail, param_lines, print_table, user_errors

__all__ = ["best_table", "register"]

_Sweeps = Annotated[
    list[str] | None, typer.Argument(help="Sweep name(s): each sweep's latest parent run and its trials.")
]
_Storage = Annotated[Path | None, typer.Option(help="The sweep's storage_path (finds its MLflow store).")]
_Uri = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: from --storage, $MLFLOW_TRACKING_URI, ./mlflow.db)."),
]
_Experiment = Annotated[
    list[str] | None, typer.Option("--experiment", help="Also every trial run of this MLflow experiment.")
]
_Filter = Annotated[
    str | None,
    typer.Option(
        "--filter", help="MLflow filter on the runs, e.g. \"params.`model.backbone` = 'resnet50'\"."
    ),
]
_Metric = Annotated[
    str | None,
    typer.Option(
        help="Validation metric that ranks runs (f1_macro, val_auc, ...; default: the sweep's metric)."
    ),
]
_Stopped = Annotated[bool, typer.Option(help="Rank runs ASHA stopped early too (they have no test metrics).")]


_RESULT_ERRORS = (ValueError, FileNotFoundError)  # a bad metric name or filter, a missing file


def _runs(sweeps, storage, tracking_uri, experiments, filter_, include_stopped):
    from ..tracking.lookup import find_runs

    return find_runs(
        list(sweeps or []),
        storage=storage,
        tracking_uri=tracking_uri,
        experiments=list(experiments or []),
        filter_string=filter_,
        include_stopped=include_stopped,
    )


# ---- best ---------------------------------------------------------------------------------------------
def best(
    sweeps: _Sweeps = None,
    storage: _Storage = None,
    tracking_uri: _Uri = None,
    experiment: _Experiment = None,
    filter_: _Filter = None,
    metric: _Metric = None,
    top: Annotated[str, typer.Option(help="Rows to show: a number, or 'all'.")] = "5",
    include_stopped: _Stopped = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")
    ] = False,
) -> None:
    """Rank a sweep's finished trials on a validation metric; show the top ones with test metrics."""
    from ..results.select import metric_key, rank_runs

    if top != "all" and not (top.isdigit() and int(top) >= 1):
        raise fail(f"--top must be a positive number or 'all', got {top!r}")
    with user_errors(*_RESULT_ERRORS):
        found = _runs(sweeps, storage, tracking_uri, experiment, filter_, include_stopped)
        metric = metric or found.default_metric
        ranked = rank_runs(found.runs, metric)
    ranked = ranked if top == "all" else ranked[: int(top)]
    key = metric_key(metric)
    if as_json:
        rows = [{"rank": i + 1, "selection_metric": key, **r.to_dict()} for i, r in enumerate(ranked)]
        typer.echo(json.dumps(rows, indent=2))
        return
    title, columns, rows, caption = best_table(ranked, key, found)
    print_table(title, columns, rows, caption)


def best_table(ranked, key: str, found) -> tuple[str, list[TableColumn], list[list[str]], str]:
    """The ``best`` table as (title, columns, rows, caption): rank, trial, the selection metric,
    test metrics (F1 and localization first), the searched values, the run id."""
    from trainer.metrics import metric_label

    from ..results.select import localization_logged

    shown = ["f1_macro", *localization_logged(ranked)]
    shown += ["accuracy", "auc", "sensitivity", "specificity", "youden_index", "discriminant_power"]
    several = len({r.sweep for r in ranked}) > 1
    # on a narrow terminal the least read go first: run id, then accuracy, spec, sens, AUC, ...
    drop = {"f1_macro": 0, "youden_index": 2, "discriminant_power": 3, "auc": 4, "sensitivity": 5}
    drop.update(specificity=6, accuracy=7, pointing_game=1, cam_in_region=2)
    columns = [TableColumn("#", "right"), *([TableColumn("sweep")] if several else []), TableColumn("trial")]
    columns += [TableColumn(f"val {metric_label(key.removeprefix('best_val_'), short=True)}", "right")]
    columns += [TableColumn(metric_label(m, short=True), "right", drop.get(m, 3)) for m in shown]
    columns += [TableColumn("params"), TableColumn("run", drop=8)]
    rows = []
    for i, r in enumerate(ranked):
        values = [_num(r.metrics.get(f"test_{m}")) for m in shown]
        head = [str(i + 1), *([r.sweep] if several else []), r.trial_id or r.run_name]
        val = _num(r.metrics[key])
        if f"{key}_std" in r.metrics:  # seed repeats: the mean over seeds, and their spread
            val += f" ±{_num(r.metrics[f'{key}_std'])}"
        rows.append([*head, val, *values, param_lines(r.searched), r.run_id[:8]])
    title = f"top {len(ranked)} of {len(found.runs)} finished runs by {key} (validation); then test metrics"
    caption = f"tracking store: {found.tracking_uri}"
    repeats = sorted({r.tags["cxr.repeats"] for r in ranked if "cxr.repeats" in r.tags})
    if repeats:
        caption = (
            f"configurations trained with {'/'.join(repeats)} seeds: means over seeds (± their std), "
            f"ranked on the mean; each seed is a nested run\n{caption}"
        )
    return title, columns, rows, caption


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


# ---- report -------------------------------------------------------------------------------------------
def report(
    sweeps: _Sweeps = None,
    storage: _Storage = None,
    tracking_uri: _Uri = None,
    experiment: _Experiment = None,
    filter_: _Filter = None,
    metric: _Metric = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the tables (default: <storage>/<sweep>/report or ./report-<sweep>)."),
    ] = None,
    log: Annotated[bool, typer.Option(help="Log the files to each sweep's parent run under report/.")] = True,
    ci: Annotated[
        bool,
        typer.Option(
            "--ci",
            help="Every cell with its 95 % bootstrap interval over the test images, from the runs' "
            "stored predictions: 0.709 [0.681, 0.736].",
        ),
    ] = False,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples of --ci.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the --ci resampling.")] = 0,
) -> None:
    """The paper's tables from a sweep's runs: Markdown, LaTeX, CSV and a YI/DP chart."""
    import tempfile

    from ..results.importance import param_importance, param_label, saved_params
    from ..results.report import build_report
    from ..results.stored import stored_intervals

    with user_errors(*_RESULT_ERRORS), tempfile.TemporaryDirectory(prefix="cxr-report-") as tmp:
        found = _runs(sweeps, storage, tracking_uri, experiment, filter_, False)
        names = list(sweeps or []) or list(experiment or [])
        out = out or _default_out(storage, names, "report")
        title = "Sweep " + ", ".join(names)
        intervals = stored_intervals(found.tracking_uri, Path(tmp), resamples, seed) if ci else None
        chosen = metric or found.default_metric
        importance = None
        if len(found.parents) == 1:  # one sweep: one search space to attribute the score to
            params = saved_params(found.tracking_uri, next(iter(found.parents.values())))
            importance = param_importance(found.runs, chosen, params)
        built = build_report(found.runs, chosen, out, title, intervals, importance)
    for warning in built.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if importance is not None and importance.values:
        top = ", ".join(f"{param_label(k)} {v:.2f}" for k, v in list(importance.values.items())[:3])
        console.print(f"what matters for {importance.metric} (fANOVA, {importance.n_trials} trials): {top}")
    for name, path in built.files.items():
        console.print(f"{name}: {path}")
    if log:
        _log_to_parents(found, built.files.values(), "report")


def _default_out(storage: Path | None, names: list[str], what: str) -> Path:
    """``<storage>/<first sweep>/<what>``, or ``./<what>-<first sweep>`` without a storage folder."""
    first = names[0]
    return (storage / first / what) if storage is not None else Path(f"{what}-{first}")


def _log_to_parents(found, files, what: str) -> None:
    """Log ``files`` to each sweep's parent run under ``<what>/`` and say so."""
    if not found.parents:
        return
    from ..tracking.parent import log_to_parent_runs

    log_to_parent_runs(found.tracking_uri, found.parents, files, what)
    for sweep, parent in found.parents.items():
        console.print(f"logged to sweep {sweep!r} parent run {parent} under {what}/", soft_wrap=True)


# ---- compare ------------------------------------------------------------------------------------------
def compare(
    sweeps: _Sweeps = None,
    storage: _Storage = None,
    tracking_uri: _Uri = None,
    experiment: _Experiment = None,
    filter_: _Filter = None,
    metric: _Metric = None,
    baseline: Annotated[
        str, typer.Option(help="The baseline runs: key=value on the run params.")
    ] = "attention.lambda=1",
    candidates: Annotated[
        str, typer.Option(help="best, top-N or all: the other runs, ranked on validation.")
    ] = "best",
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    alpha: Annotated[float, typer.Option(help="Significance level of the verdicts.")] = 0.05,
    min_images: Annotated[int, typer.Option(help="Fewest test images an interval is given for.")] = 20,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for compare.json/.md/.tex (default: <storage>/<sweep>/compare)."),
    ] = None,
    log: Annotated[
        bool, typer.Option(help="Log the files to each sweep's parent run under compare/.")
    ] = True,
) -> None:
    """Does the attention loss beat CE? The best attention run(s) against the CE baseline on the
    same test images: Δ with bootstrap intervals, DeLong, McNemar, Holm."""
    from ..results.compare import compare_runs, write_comparison

    with user_errors(*_RESULT_ERRORS):
        found = _runs(sweeps, storage, tracking_uri, experiment, filter_, False)
        names = list(sweeps or []) or list(experiment or [])
        comps = compare_runs(
            found.runs,
            found.tracking_uri,
            metric or found.default_metric,
            baseline=baseline,
            candidates=candidates,
            n_resamples=resamples,
            seed=seed,
            alpha=alpha,
            min_images=min_images,
        )
        out = out or _default_out(storage, names, "compare")
        files = write_comparison(comps, out, resamples, seed)
    columns = [TableColumn("task/model"), TableColumn("candidate"), TableColumn("baseline", drop=3)]
    columns += [TableColumn(f"Δ {metric_label_short(m)}", "right", drop) for m, drop in _COMPARED]
    columns += [TableColumn("p ΔF1", "right")]
    rows = []
    for c in comps:
        deltas = [
            f"{c.deltas[m].delta:+.3f}\n[{c.deltas[m].low:+.3f}, {c.deltas[m].high:+.3f}]"
            for m, _ in _COMPARED
        ]
        rows.append(
            [f"{c.task}/{c.backbone}", c.candidate.run_name, c.baseline.run_name, *deltas, f"{c.p_f1:.2g}"]
        )
    title = f"candidate − baseline on the test set, 95 % paired bootstrap intervals ({resamples} resamples)"
    print_table(title, columns, rows, f"tracking store: {found.tracking_uri}")
    for c in comps:
        console.print(c.verdict, highlight=False, soft_wrap=True, markup=False)
    for name, path in files.items():
        console.print(f"{name}: {path}", soft_wrap=True)
    if log:
        _log_to_parents(found, files.values(), "compare")


_COMPARED = (("f1_macro", 0), ("youden_index", 1), ("discriminant_power", 2), ("accuracy", 4), ("auc", 3))


def metric_label_short(name: str) -> str:
    from trainer.metrics import metric_label

    return metric_label(name, short=True)


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
    storage: _Storage = None,
    tracking_uri: _Uri = None,
    metric: _Metric = None,
    atol: Annotated[float, typer.Option(help="Largest allowed |logit difference| to PyTorch.")] = 1e-4,
    register: Annotated[bool, typer.Option(help="Register the model in the MLflow Model Registry.")] = True,
    name: Annotated[str | None, typer.Option(help="Registered model name (default: cxr-<sweep>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
) -> None:
    """Export the best (or a given) run's model to TorchScript/ONNX, with a model card, and register it."""
    from ..results.export import export_model, parse_formats

    with user_errors(*_RESULT_ERRORS):
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

    with user_errors(*_RESULT_ERRORS):
        result = predict_folder(
            model, images, out, runtime=runtime, cam=cam, batch_size=batch_size, overwrite=overwrite
        )
    console.print(f"{len(result.names)} images, probabilities from {result.runtime}: {result.csv}")
    if result.overlays:
        console.print(f"Grad-CAM overlays: {result.out_dir / 'cam'} ({len(result.overlays)} PNGs)")


# ---- ui -----------------------------------------------------------------------------------------------
def ui(
    sweep: Annotated[str | None, typer.Argument(help="Sweep name: open its runs directly.")] = None,
    storage: _Storage = None,
    tracking_uri: _Uri = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 5000,
) -> None:
    """Start the MLflow UI on the sweep's tracking store (127.0.0.1 only) and print its URLs: the
    trials best first with their λ, mode, searched values, F1, YI and DP; the top runs compared."""
    from mlflow.tracking import MlflowClient

    from ..results.ui import experiment_url, start_ui, stop_ui
    from ..tracking.lookup import open_store, sweep_experiment

    with user_errors(*_RESULT_ERRORS):
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
    for fn in (best, report, compare, export, predict, ui):
        app.command(fn.__name__)(fn)
