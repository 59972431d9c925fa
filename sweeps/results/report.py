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
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.metrics import higher_is_better, metric_label
from trainer.tasks import TASKS

from ..tracking.lookup import RunRow
from .select import localization_logged, metric_key, rank_runs, summary_metrics

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


def _lambda_order(label: str) -> tuple[int, float]:
    return (1, 0.0) if label == "*" else (0, -float(label))


def _task_title(task: str) -> str:
    classes = TASKS.get(task)
    if classes is None:
        return task
    if len(classes) == 2:
        return f"{task}: {classes[0]} vs {classes[1]}"
    return f"{task}: " + ", ".join(classes)


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


def build_report(runs: list[RunRow], metric: str, out_dir: str | Path, title: str) -> Report:
    """Write ``report.md``, ``report.tex``, ``summary.csv``, ``detail.csv`` and ``yi_dp.png``."""
    rank_runs(runs, metric)  # a metric nobody logged fails here, naming the logged ones
    cells = _best_cells(runs, metric)
    metrics = summary_metrics(runs)
    detail = _detail_rows(cells, metrics)
    shown = [*SUMMARY_METRICS, *localization_logged(runs)]
    summary = _summary_rows(cells, shown, metric)
    warnings = _missing(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "summary.csv": _write_csv(out / "summary.csv", summary),
        "detail.csv": _write_csv(out / "detail.csv", detail),
        "report.md": _write(out / "report.md", _markdown(summary, detail, metric, title, warnings)),
        "report.tex": _write(out / "report.tex", _latex(summary, detail, metric, title)),
        "yi_dp.png": _chart(summary, out / "yi_dp.png"),
    }
    return Report(summary, detail, files, warnings)


def _missing(summary: list[dict[str, object]]) -> list[str]:
    """One line per model whose CE baseline or attention side has no finished run."""
    out = []
    for task, backbone in dict.fromkeys((str(r["task"]), str(r["backbone"])) for r in summary):
        row = _pick(summary, task=task, backbone=backbone)
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
def _detail_rows(cells, metrics: list[str]) -> list[dict[str, object]]:
    rows = []
    for (task, backbone, lam), (run, n) in sorted(cells.items(), key=lambda kv: _cell_order(kv[0])):
        for m in metrics:
            value = run.metrics.get(f"test_{m}", math.nan)
            rows.append(
                {
                    "task": task,
                    "backbone": backbone,
                    "lambda": lam,
                    "metric": m,
                    "value": value,
                    "run_id": run.run_id,
                    "mode": _mode_of(run),
                    "runs_in_setting": n,
                }
            )
    for row in rows:
        same_task = [r for r in rows if r["task"] == row["task"] and r["metric"] == row["metric"]]
        same_model = [r for r in same_task if r["backbone"] == row["backbone"]]
        row["best_in_backbone"] = _is_best(row, same_model)
        row["best_overall"] = _is_best(row, same_task)
    return rows


def _cell_order(key: tuple[str, str, str]) -> tuple:
    task, backbone, lam = key
    return (task, backbone, _lambda_order(lam))


def _is_best(row: dict[str, object], rows: list[dict[str, object]]) -> bool:
    values = [float(r["value"]) for r in rows if math.isfinite(float(r["value"]))]
    v = float(row["value"])
    if not values or not math.isfinite(v):
        return False
    best = max(values) if higher_is_better(str(row["metric"])) else min(values)
    return v == best


def _summary_rows(cells, metrics: list[str], selection: str) -> list[dict[str, object]]:
    by_model: dict[tuple[str, str], dict[str, RunRow]] = {}
    for (task, backbone, lam), (run, _) in cells.items():
        by_model.setdefault((task, backbone), {})[lam] = run
    rows = []
    for (task, backbone), runs in sorted(by_model.items()):
        ce = runs.get("1")
        attention = [r for lam, r in runs.items() if lam != "1"]
        att = rank_runs(attention, selection)[0] if attention else None
        for m in metrics:
            rows.append(
                {
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
            )
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


def _fmt(v: object) -> str:
    return "–" if not isinstance(v, float) or math.isnan(v) else f"{v:.3f}"


def _tasks(rows: list[dict[str, object]]) -> list[str]:
    return sorted({str(r["task"]) for r in rows})


def _backbones(rows: list[dict[str, object]], task: str) -> list[str]:
    return sorted({str(r["backbone"]) for r in rows if r["task"] == task})


def _lambdas(rows: list[dict[str, object]], task: str) -> list[str]:
    return sorted({str(r["lambda"]) for r in rows if r["task"] == task}, key=_lambda_order)


def _metrics(rows: list[dict[str, object]], task: str) -> list[str]:
    return list(dict.fromkeys(str(r["metric"]) for r in rows if r["task"] == task))


def _pick(rows, **match) -> dict[str, object] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def _mark(row: dict[str, object] | None, bold, underline) -> str:
    if row is None:
        return "–"
    text = _fmt(row["value"])
    if row["best_in_backbone"]:
        text = bold(text)
    if row["best_overall"]:
        text = underline(text)
    return text


def _markdown(summary, detail, metric: str, title: str, warnings: list[str]) -> str:
    lines = [
        f"# {title}",
        "",
        f"Every number is a `test_*` metric as logged. Runs are chosen on validation only "
        f"(`{metric_key(metric)}`) among finished runs; CE = λ 1, best attention = the best λ ≠ 1 run "
        "of the backbone. λ = a number: that fixed λ; λ = *: the paper's adaptive schedule; another "
        "schedule by its name. Where several runs share a λ (other searched values differ), the cell is "
        "the one chosen on validation and its mode row says which loss mode it trained with.",
        "",
    ]
    lines += [f"> **Missing:** {w}" for w in warnings] + ([""] if warnings else [])
    for task in _tasks(summary):
        models = _backbones(summary, task)
        lines += [f"## {_task_title(task)} — CE / best attention", ""]
        lines += ["| Metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for m in _metrics(summary, task):
            cells = []
            for b in models:
                r = _pick(summary, task=task, backbone=b, metric=m)
                cells.append(f"{_fmt(r['ce'])}/{_fmt(r['attention'])}" if r else "–")
            lines.append(f"| {metric_label(m)} | " + " | ".join(cells) + " |")
        att = [
            f"{b}: {r['attention_setting']}"
            for b in models
            if (r := _pick(summary, task=task, backbone=b)) and r["attention_setting"]
        ]
        lines += ["", "Best attention setting: " + ("; ".join(att) or "none") + ".", ""]
    for task in _tasks(detail):
        lams = _lambdas(detail, task)
        lines += [
            f"## {_task_title(task)} — per λ (bold: best within the backbone, underline: best overall)",
            "",
            "| Model | Metric | " + " | ".join(f"λ = {lam}" for lam in lams) + " |",
            "|---|---|" + "---:|" * len(lams),
        ]
        for b in _backbones(detail, task):
            for i, m in enumerate(_metrics(detail, task)):
                cells = [
                    _mark(_pick(detail, task=task, backbone=b, metric=m, **{"lambda": lam}), _md_b, _md_u)
                    for lam in lams
                ]
                lines.append(f"| {b if i == 0 else ''} | {metric_label(m)} | " + " | ".join(cells) + " |")
            modes = [
                str(r["mode"]) if (r := _pick(detail, task=task, backbone=b, **{"lambda": lam})) else "–"
                for lam in lams
            ]
            lines.append("| | mode | " + " | ".join(modes) + " |")
        lines.append("")
    return "\n".join(lines)


def _md_b(t: str) -> str:
    return f"**{t}**"


def _md_u(t: str) -> str:
    return f"<u>{t}</u>"


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def _latex(summary, detail, metric: str, title: str) -> str:
    out = [
        f"% {title}: generated by cxr-sweep report; test metrics, runs chosen on {metric_key(metric)}",
    ]
    for task in _tasks(summary):
        models = _backbones(summary, task)
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex_escape(_task_title(task))}: cross-entropy / best attention loss}}",
            r"\begin{tabular}{l" + "c" * len(models) + "}",
            r"\hline",
            "Metric & " + " & ".join(_tex_escape(b) for b in models) + r" \\",
            r"\hline",
        ]
        for m in _metrics(summary, task):
            cells = []
            for b in models:
                r = _pick(summary, task=task, backbone=b, metric=m)
                cells.append(f"{_fmt(r['ce'])}/{_fmt(r['attention'])}" if r else "--")
            out.append(f"{_tex_escape(metric_label(m))} & " + " & ".join(cells) + r" \\")
        out += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
    for task in _tasks(detail):
        lams = _lambdas(detail, task)
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex_escape(_task_title(task))}: results per $\lambda$ "
            r"($\lambda = *$: adaptive; bold: best within the model, underline: best over all models)}",
            r"\begin{tabular}{ll" + "r" * len(lams) + "}",
            r"\hline",
            "Model & Metric & " + " & ".join(f"$\\lambda = {lam}$" for lam in lams) + r" \\",
            r"\hline",
        ]
        for b in _backbones(detail, task):
            for i, m in enumerate(_metrics(detail, task)):
                cells = [
                    _mark(_pick(detail, task=task, backbone=b, metric=m, **{"lambda": lam}), _tex_b, _tex_u)
                    for lam in lams
                ]
                cells = [c.replace("–", "--") for c in cells]
                model = _tex_escape(b) if i == 0 else ""
                out.append(f"{model} & {_tex_escape(metric_label(m))} & " + " & ".join(cells) + r" \\")
            out.append(r"\hline")
        out += [r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def _tex_b(t: str) -> str:
    return rf"\textbf{{{t}}}"


def _tex_u(t: str) -> str:
    return rf"\underline{{{t}}}"


def _chart(summary: list[dict[str, object]], path: Path) -> Path:
    """Grouped bars: Youden's index and DP per backbone, CE beside best attention, one row per task."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = _tasks(summary) or ["–"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        models = _backbones(summary, task)
        x = np.arange(len(models))
        for ax, m in zip(row, ("youden_index", "discriminant_power"), strict=True):
            for shift, key, label in ((-0.2, "ce", "CE (λ = 1)"), (0.2, "attention", "best attention")):
                vals = [
                    float(r[key]) if (r := _pick(summary, task=task, backbone=b, metric=m)) else math.nan
                    for b in models
                ]
                bars = ax.bar(x + shift, np.nan_to_num(vals), width=0.4, label=label)
                ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=7)
            ax.set_xticks(x, models, rotation=15)
            ax.set_title(f"{_task_title(task)} — {metric_label(m)}", fontsize=9)
            ax.axhline(0, color="black", lw=0.6)
        row[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
