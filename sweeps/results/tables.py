"""Rendering of the report's rows (:mod:`sweeps.results.report`): the Markdown and LaTeX tables,
with their bold / underline marks and intervals, and the PNG of YI and DP per backbone."""

from __future__ import annotations

import math
from pathlib import Path

from trainer.metrics import metric_label
from trainer.tasks import TASKS

from .select import metric_key

__all__ = ["chart", "lambda_order", "latex", "markdown", "save_png", "task_title"]


def lambda_order(label: str) -> tuple[int, float]:
    return (1, 0.0) if label == "*" else (0, -float(label))


def task_title(task: str) -> str:
    classes = TASKS.get(task)
    if classes is None:
        return task
    if len(classes) == 2:
        return f"{task}: {classes[0]} vs {classes[1]}"
    return f"{task}: " + ", ".join(classes)


def _fmt(v: object) -> str:
    return "–" if not isinstance(v, float) or math.isnan(v) else f"{v:.3f}"


def _pair(row: dict[str, object]) -> str:
    """A summary cell: ``CE/attention``, or with intervals ``CE [l, h] / attention [l, h]``."""
    sep = " / " if "ce_low" in row else "/"
    return f"{_with_ci(row, 'ce')}{sep}{_with_ci(row, 'attention')}"


def _with_ci(row: dict[str, object], key: str) -> str:
    """``0.709 [0.681, 0.736]`` where the row has an interval for ``key`` (``value``, ``ce``, ...)."""
    stem = "" if key == "value" else f"{key}_"
    low, high = row.get(f"{stem}low", math.nan), row.get(f"{stem}high", math.nan)
    text = _fmt(row[key])
    if isinstance(low, float) and math.isfinite(low) and text != "–":
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _tasks(rows: list[dict[str, object]]) -> list[str]:
    return sorted({str(r["task"]) for r in rows})


def _backbones(rows: list[dict[str, object]], task: str) -> list[str]:
    return sorted({str(r["backbone"]) for r in rows if r["task"] == task})


def _lambdas(rows: list[dict[str, object]], task: str) -> list[str]:
    return sorted({str(r["lambda"]) for r in rows if r["task"] == task}, key=lambda_order)


def _metrics(rows: list[dict[str, object]], task: str) -> list[str]:
    return list(dict.fromkeys(str(r["metric"]) for r in rows if r["task"] == task))


def _pick(rows, **match) -> dict[str, object] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def _mark(row: dict[str, object] | None, bold, underline) -> str:
    if row is None:
        return "–"
    text = _with_ci(row, "value")
    if row["best_in_backbone"]:
        text = bold(text)
    if row["best_overall"]:
        text = underline(text)
    return text


def markdown(summary, detail, metric: str, title: str, warnings: list[str], importance=None) -> str:
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
    if any("low" in r for r in detail):
        lines += [
            "Brackets: a 95 % interval, the percentile bootstrap over the run's stored test predictions "
            "(stratified resamples of the test images; a configuration trained with seed repeats: the "
            "mean over its seeds). Localization scores have none (the predictions hold no CAMs).",
            "",
        ]
    lines += [f"> **Missing:** {w}" for w in warnings] + ([""] if warnings else [])
    for task in _tasks(summary):
        models = _backbones(summary, task)
        lines += [f"## {task_title(task)} — CE / best attention", ""]
        lines += ["| Metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for m in _metrics(summary, task):
            cells = []
            for b in models:
                r = _pick(summary, task=task, backbone=b, metric=m)
                cells.append(_pair(r) if r else "–")
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
            f"## {task_title(task)} — per λ (bold: best within the backbone, underline: best overall)",
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
    if importance is not None:
        lines += importance_lines(importance)
    return "\n".join(lines)


def _md_b(t: str) -> str:
    return f"**{t}**"


def _md_u(t: str) -> str:
    return f"<u>{t}</u>"


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def latex(summary, detail, metric: str, title: str) -> str:
    out = [
        f"% {title}: generated by cxr-sweep report; test metrics, runs chosen on {metric_key(metric)}",
    ]
    for task in _tasks(summary):
        models = _backbones(summary, task)
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex_escape(task_title(task))}: cross-entropy / best attention loss}}",
            r"\begin{tabular}{l" + "c" * len(models) + "}",
            r"\hline",
            "Metric & " + " & ".join(_tex_escape(b) for b in models) + r" \\",
            r"\hline",
        ]
        for m in _metrics(summary, task):
            cells = []
            for b in models:
                r = _pick(summary, task=task, backbone=b, metric=m)
                cells.append(_pair(r) if r else "--")
            out.append(f"{_tex_escape(metric_label(m))} & " + " & ".join(cells) + r" \\")
        out += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
    for task in _tasks(detail):
        lams = _lambdas(detail, task)
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex_escape(task_title(task))}: results per $\lambda$ "
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


def chart(summary: list[dict[str, object]], path: Path) -> Path:
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
            ax.set_title(f"{task_title(task)} — {metric_label(m)}", fontsize=9)
            ax.axhline(0, color="black", lw=0.6)
        row[0].legend(fontsize=7, loc="upper left")
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` whole (a temporary file, then renamed) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def importance_lines(imp) -> list[str]:
    """The report's section on which searched settings matter (:mod:`sweeps.results.importance`)."""
    from .importance import param_label

    lines = [f"## Which searched settings matter for `{imp.metric}` (fANOVA, {imp.n_trials} trials)", ""]
    if not imp.values:
        return [*lines, f"Not computed: {imp.note}.", ""]
    lines += [
        "Share of the variance of the validation score over the finished trials that each setting "
        "explains (Optuna's fANOVA; sums to 1). A ranking of settings for this sweep, not a causal claim.",
        "",
        "| Setting | Importance |",
        "|---|---:|",
    ]
    lines += [f"| {param_label(k)} | {v:.3f} |" for k, v in imp.values.items()]
    if imp.left_out:
        lines += [
            "",
            "Left out (drawn by some trials only): " + ", ".join(map(param_label, imp.left_out)) + ".",
        ]
    return [*lines, ""]
