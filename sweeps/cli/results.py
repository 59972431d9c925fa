"""What users do after a sweep: ``best``, ``report`` and ``compare`` (``export``, ``predict`` and ``ui``
are in :mod:`.deliver`).

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
from .options import (
    RESULT_ERRORS,
    ExperimentOpt,
    FilterOpt,
    MetricOpt,
    StoppedOpt,
    StorageOpt,
    SweepsOpt,
    UriOpt,
)

__all__ = ["best_table", "register"]


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


def _top_runs(sweep, n, metric, storage, tracking_uri, filter_, include_stopped):
    """The sweep's best ``n`` runs only (a sweep of thousands: MLflow sorts, a page is read)."""
    from trainer.metrics import higher_is_better

    from ..results.select import metric_key
    from ..tracking.lookup import find_top_runs

    class Unranked(Exception):
        pass

    def key(default: str) -> tuple[str, bool]:
        k = metric_key(metric or default)
        try:
            return k, higher_is_better(k)
        except Exception:  # not a metric name: the full search says what the runs logged instead
            raise Unranked from None

    try:
        return find_top_runs(
            sweep, n, key, storage=storage, tracking_uri=tracking_uri, filter_string=filter_,
            include_stopped=include_stopped,
        )  # fmt: skip
    except Unranked:
        return _runs([sweep], storage, tracking_uri, None, filter_, include_stopped)


# ---- best ---------------------------------------------------------------------------------------------
def best(
    sweeps: SweepsOpt = None,
    storage: StorageOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = None,
    filter_: FilterOpt = None,
    metric: MetricOpt = None,
    top: Annotated[str, typer.Option(help="Rows to show: a number, or 'all'.")] = "5",
    include_stopped: StoppedOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")
    ] = False,
    pareto: Annotated[
        bool,
        typer.Option(
            "--pareto",
            help="The Pareto front of the sweep's metrics (or --metric a,b): the runs no other run beats "
            "on every one of them (validation).",
        ),
    ] = False,
) -> None:
    """Rank a sweep's finished trials on a validation metric; show the top ones with test metrics."""
    from ..results.select import metric_key, pareto_runs, rank_runs

    if top != "all" and not (top.isdigit() and int(top) >= 1):
        raise fail(f"--top must be a positive number or 'all', got {top!r}")
    with user_errors(*RESULT_ERRORS):
        if not pareto and top != "all" and len(sweeps or []) == 1 and not experiment:
            found = _top_runs(sweeps[0], int(top), metric, storage, tracking_uri, filter_, include_stopped)
        else:
            found = _runs(sweeps, storage, tracking_uri, experiment, filter_, include_stopped)
        if pareto:
            metrics = [m.strip() for m in metric.split(",") if m.strip()] if metric else found.objectives
            ranked = pareto_runs(found.runs, metrics)
            metric = metrics[0]
        else:
            metric = metric or found.default_metric
            ranked = rank_runs(found.runs, metric)
    if not pareto:
        ranked = ranked if top == "all" else ranked[: int(top)]
    key = metric_key(metric)
    if as_json:
        rows = [{"rank": i + 1, "selection_metric": key, **r.to_dict()} for i, r in enumerate(ranked)]
        typer.echo(json.dumps(rows, indent=2))
        return
    title, columns, rows, caption = best_table(ranked, key, found, metrics if pareto else None)
    print_table(title, columns, rows, caption)


def best_table(
    ranked, key: str, found, front: list[str] | None = None
) -> tuple[str, list[TableColumn], list[list[str]], str]:
    """The ``best`` table as (title, columns, rows, caption): rank, trial, the selection metric,
    test metrics (F1 and localization first), the searched values, the run id. ``front``: the
    metrics of a Pareto front (each a validation column)."""
    from trainer.metrics import metric_label

    from ..results.select import localization_logged, metric_key

    shown = ["f1_macro", *localization_logged(ranked)]
    shown += ["accuracy", "auc", "sensitivity", "specificity", "youden_index", "discriminant_power"]
    several = len({r.sweep for r in ranked}) > 1
    # on a narrow terminal the least read go first: run id, then accuracy, spec, sens, AUC, ...
    drop = {"f1_macro": 0, "youden_index": 2, "discriminant_power": 3, "auc": 4, "sensitivity": 5}
    drop.update(specificity=6, accuracy=7, pointing_game=1, cam_in_region=2)
    columns = [TableColumn("#", "right"), *([TableColumn("sweep")] if several else []), TableColumn("trial")]
    vals = [metric_key(m) for m in front] if front else [key]
    columns += [
        TableColumn(f"val {metric_label(v.removeprefix('best_val_'), short=True)}", "right") for v in vals
    ]
    columns += [TableColumn(metric_label(m, short=True), "right", drop.get(m, 3)) for m in shown]
    columns += [TableColumn("params"), TableColumn("run", drop=8)]
    rows = []
    for i, r in enumerate(ranked):
        values = [_num(r.metrics.get(f"test_{m}")) for m in shown]
        head = [str(i + 1), *([r.sweep] if several else []), r.trial_id or r.run_name]
        cells = []
        for v in vals:
            cells.append(_num(r.metrics[v]))
            if f"{v}_std" in r.metrics:  # seed repeats: the mean over seeds, and their spread
                cells[-1] += f" ±{_num(r.metrics[f'{v}_std'])}"
        rows.append([*head, *cells, *values, param_lines(r.searched), r.run_id[:8]])
    total = f"of {len(found.runs)} " if found.complete else ""  # only the best were read: no count
    title = f"top {len(ranked)} {total}finished runs by {key} (validation); then test metrics"
    if front:
        title = (
            f"Pareto front: {len(ranked)} of {len(found.runs)} finished runs that no other beats on all of "
            f"{', '.join(vals)} (validation); then test metrics"
        )
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
    sweeps: SweepsOpt = None,
    storage: StorageOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = None,
    filter_: FilterOpt = None,
    metric: MetricOpt = None,
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

    with user_errors(*RESULT_ERRORS), tempfile.TemporaryDirectory(prefix="cxr-report-") as tmp:
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
        built = build_report(found.runs, chosen, out, title, intervals, importance, found.objectives)
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
    sweeps: SweepsOpt = None,
    storage: StorageOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = None,
    filter_: FilterOpt = None,
    metric: MetricOpt = None,
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

    with user_errors(*RESULT_ERRORS):
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


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    for fn in (best, report, compare):
        app.command(fn.__name__)(fn)
