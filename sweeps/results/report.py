"""The paper's result tables, rebuilt from a sweep's MLflow runs.

- **Summary** (Tables I/II): per task and backbone, sensitivity, specificity, Youden's index,
  discriminant power and macro F1 (plus pointing game and CAM-in-lesion share where runs logged
  them) as ``CE / best attention``. CE is the λ = 1 run; "best attention" is the
  λ ≠ 1 run with the best validation score (the paper: "the best-performing configuration from all
  settings of each model").
- **Detail** (Tables III–IX): per task, backbone × λ setting (1, 0.75, …, ``*`` = adaptive), every
  metric; bold = best within the backbone, underline = best over all backbones of the task.

Where several runs share a (task, backbone, λ) cell — other searched values such as t or the lr —
the cell is the run with the best validation score (``select.rank_runs``); test numbers are only
ever reported, never used to choose. Every cell is a ``test_*`` metric exactly as logged.
Outputs: Markdown, LaTeX, two CSVs (full precision) and a PNG of YI and DP per backbone.

With intervals (``report --ci``) every cell also shows a 95 % interval, ``0.709 [0.681, 0.736]``:
a percentile bootstrap over the run's stored test predictions (stratified resamples of the test
images; a configuration trained with seed repeats: of the mean over its seeds, each scored on the
same resample). Localization scores need the CAMs, which predictions do not hold: no interval.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.metrics import higher_is_better

from ..tracking.lookup import RunRow
from .front import front_chart
from .importance import Importance, param_label
from .select import localization_logged, rank_runs, summary_metrics
from .tables import chart, lambda_order, latex, markdown

__all__ = ["SUMMARY_METRICS", "Report", "build_report", "lambda_label"]

# the paper's Tables I/II rows, and macro F1 (the selection metric by default) beside them
SUMMARY_METRICS = ("sensitivity", "specificity", "youden_index", "discriminant_power", "f1_macro")


@dataclass
class Report:
    """Rows of both tables and the files written from them."""

    summary: list[dict[str, object]]
    detail: list[dict[str, object]]
    files: dict[str, Path]
    warnings: list[str]  # what the tables cannot show (a missing CE baseline), also in report.md


def lambda_label(value: str) -> str:
    """The paper's column label of an ``attention.lambda`` param: ``1``, ``0.75``, ``*`` (adaptive)."""
    if value == "adaptive":
        return "*"
    try:
        return f"{float(value):g}"
    except ValueError:
        return value


def _best_cells(runs: list[RunRow], metric: str) -> dict[tuple[str, str, str], tuple[RunRow, int]]:
    """(task, backbone, λ label) → (the run chosen on validation, how many runs shared the cell)."""
    groups: dict[tuple[str, str, str], list[RunRow]] = {}
    for r in runs:
        key = (
            r.params.get("data.task", "?"),
            r.params.get("model.backbone", "?"),
            lambda_label(r.params.get("attention.lambda", "?")),
        )
        groups.setdefault(key, []).append(r)
    return {k: (rank_runs(v, metric)[0], len(v)) for k, v in groups.items()}


Intervals = Callable[[RunRow], dict[str, tuple[float, float]]]


def build_report(
    runs: list[RunRow],
    metric: str,
    out_dir: str | Path,
    title: str,
    intervals: Intervals | None = None,
    importance: Importance | None = None,
    objectives: list[str] | None = None,
) -> Report:
    """Write ``report.md``, ``report.tex``, ``summary.csv``, ``detail.csv`` and ``yi_dp.png``.

    ``intervals``: a run → ``{metric: (low, high)}`` (the test metrics' 95 % intervals), called once
    for each run a table shows; the cells then read ``value [low, high]``. ``importance``: the
    fANOVA importances of the searched settings (``importance.csv`` and a section of report.md).
    ``objectives``: a multi-objective sweep's metrics: ``pareto.png`` draws their front."""
    rank_runs(runs, metric)  # a metric nobody logged fails here, naming the logged ones
    cells = _best_cells(runs, metric)
    metrics = summary_metrics(runs)
    ci = _cached(intervals) if intervals else None
    detail = _detail_rows(cells, metrics, ci)
    shown = [*SUMMARY_METRICS, *localization_logged(runs)]
    summary = _summary_rows(cells, shown, metric, ci)
    warnings = _missing(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "summary.csv": _write_csv(out / "summary.csv", summary),
        "detail.csv": _write_csv(out / "detail.csv", detail),
        "report.md": _write(
            out / "report.md", markdown(summary, detail, metric, title, warnings, importance)
        ),
        "report.tex": _write(out / "report.tex", latex(summary, detail, metric, title)),
        "yi_dp.png": chart(summary, out / "yi_dp.png"),
    }
    if objectives and len(objectives) > 1:
        files["pareto.png"] = front_chart(runs, objectives, out / "pareto.png")
    if importance is not None and importance.values:
        rows = [
            {"parameter": k, "label": param_label(k), "importance": v} for k, v in importance.values.items()
        ]
        files["importance.csv"] = _write_csv(out / "importance.csv", rows)
    return Report(summary, detail, files, warnings)


def _cached(intervals: Intervals) -> Intervals:
    seen: dict[str, dict[str, tuple[float, float]]] = {}

    def of(run: RunRow) -> dict[str, tuple[float, float]]:
        if run.run_id not in seen:
            seen[run.run_id] = intervals(run)
        return seen[run.run_id]

    return of


_NO_CI = (math.nan, math.nan)


def _missing(summary: list[dict[str, object]]) -> list[str]:
    """One line per model whose CE baseline or attention side has no finished run."""
    out = []
    for task, backbone in dict.fromkeys((str(r["task"]), str(r["backbone"])) for r in summary):
        row = next((r for r in summary if r["task"] == task and r["backbone"] == backbone), None)
        if row and not row["ce_run_id"]:
            out.append(
                f"{task}/{backbone}: no CE baseline (no finished run with λ = 1), so its CE cells read –. "
                "Run one first: `search: {points_to_evaluate: [{attention.lambda: 1.0}]}` in the sweep file."
            )
        if row and not row["attention_run_id"]:
            out.append(
                f"{task}/{backbone}: no finished attention run (λ ≠ 1), so its attention cells read –."
            )
    return out


def _mode_of(run: RunRow) -> str:
    """The loss mode a run trained with: ``CE`` for λ = 1 (no attention loss)."""
    if lambda_label(run.params.get("attention.lambda", "")) == "1":
        return "CE"
    return run.params.get("attention.mode", "?")


def _setting(run: RunRow) -> str:
    """The winning run's mode and searched values, e.g. ``soft, λ = 0.874, threshold 0.61``."""
    parts = [_mode_of(run), f"λ = {lambda_label(run.params.get('attention.lambda', '?'))}"]
    parts += [
        f"{k.rsplit('.', 1)[-1]} {_short(v)}" for k, v in run.searched.items() if k != "attention.lambda"
    ]
    return ", ".join(parts)


def _short(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---- rows --------------------------------------------------------------------------------------------
def _detail_rows(cells, metrics: list[str], ci: Intervals | None) -> list[dict[str, object]]:
    rows = []
    for (task, backbone, lam), (run, n) in sorted(cells.items(), key=lambda kv: _cell_order(kv[0])):
        for m in metrics:
            value = run.metrics.get(f"test_{m}", math.nan)
            row = {
                "task": task,
                "backbone": backbone,
                "lambda": lam,
                "metric": m,
                "value": value,
                "run_id": run.run_id,
                "mode": _mode_of(run),
                "runs_in_setting": n,
            }
            if ci is not None:
                row["low"], row["high"] = ci(run).get(m, _NO_CI)
            rows.append(row)
    for row in rows:
        same_task = [r for r in rows if r["task"] == row["task"] and r["metric"] == row["metric"]]
        same_model = [r for r in same_task if r["backbone"] == row["backbone"]]
        row["best_in_backbone"] = _is_best(row, same_model)
        row["best_overall"] = _is_best(row, same_task)
    return rows


def _cell_order(key: tuple[str, str, str]) -> tuple:
    task, backbone, lam = key
    return (task, backbone, lambda_order(lam))


def _is_best(row: dict[str, object], rows: list[dict[str, object]]) -> bool:
    values = [float(r["value"]) for r in rows if math.isfinite(float(r["value"]))]
    v = float(row["value"])
    if not values or not math.isfinite(v):
        return False
    best = max(values) if higher_is_better(str(row["metric"])) else min(values)
    return v == best


def _summary_rows(cells, metrics: list[str], selection: str, ci: Intervals | None) -> list[dict[str, object]]:
    by_model: dict[tuple[str, str], dict[str, RunRow]] = {}
    for (task, backbone, lam), (run, _) in cells.items():
        by_model.setdefault((task, backbone), {})[lam] = run
    rows = []
    for (task, backbone), runs in sorted(by_model.items()):
        ce = runs.get("1")
        attention = [r for lam, r in runs.items() if lam != "1"]
        att = rank_runs(attention, selection)[0] if attention else None
        for m in metrics:
            row = {
                "task": task,
                "backbone": backbone,
                "metric": m,
                "ce": ce.metrics.get(f"test_{m}", math.nan) if ce else math.nan,
                "attention": att.metrics.get(f"test_{m}", math.nan) if att else math.nan,
                "ce_run_id": ce.run_id if ce else "",
                "attention_run_id": att.run_id if att else "",
                "attention_lambda": lambda_label(att.params.get("attention.lambda", "")) if att else "",
                "attention_setting": _setting(att) if att else "",
            }
            if ci is not None:
                row["ce_low"], row["ce_high"] = ci(ce).get(m, _NO_CI) if ce else _NO_CI
                row["attention_low"], row["attention_high"] = ci(att).get(m, _NO_CI) if att else _NO_CI
            rows.append(row)
    return rows


# ---- files -------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        w.writeheader()
        w.writerows({k: _csv_value(v) for k, v in r.items()} for r in rows)
    tmp.replace(path)
    return path


def _csv_value(v: object) -> object:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)  # full precision: the CSV equals the logged metric
    return v
