"""Does the attention loss beat cross-entropy here? The best attention configuration(s), chosen on
validation, against the CE baseline of the same task and backbone, on the same test images.

Every number comes from the runs' stored per-image predictions (``predictions/predictions.csv``,
written by every finished trial): Δ of macro F1, Youden's index, DP, accuracy and AUC with a 95 %
paired, stratified bootstrap interval; DeLong's test for ΔAUC (binary tasks); the exact McNemar
test for accuracy; Holm's correction when several candidates face one baseline. Test data is
only compared, never used to choose: baseline and candidates are picked on validation.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.metrics import metric_label

from ..tracking.lookup import RunRow, SelectionError
from ..tracking.runs import PREDICTIONS_FILE
from .select import rank_runs
from .stats import Delta, delong, holm, mcnemar_exact, paired_bootstrap

__all__ = ["MIN_TEST_IMAGES", "Comparison", "compare_runs", "parse_candidates", "write_comparison"]

MIN_TEST_IMAGES = 20  # fewer, and a bootstrap interval says little


@dataclass
class Comparison:
    """One candidate against its baseline on one test set."""

    task: str
    backbone: str
    baseline: RunRow
    candidate: RunRow
    n_images: int
    deltas: dict[str, Delta]
    delong: dict[str, float] | None  # auc_baseline, auc_candidate, z, p (binary tasks)
    mcnemar: dict[str, float]  # only_baseline_right, only_candidate_right, p
    p_f1: float = math.nan  # ΔF1's p after Holm over the candidates of this baseline
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        d = self.deltas["f1_macro"]
        word = "significant" if self.p_f1 < self.alpha else "not significant"
        return (
            f"{self.candidate.run_name}: ΔF1 {d.delta:+.3f} [{d.low:+.3f}, {d.high:+.3f}], "
            f"p = {self.p_f1:.2g}: {word} at {self.alpha:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "backbone": self.backbone,
            "baseline": {"run_id": self.baseline.run_id, "run_name": self.baseline.run_name},
            "candidate": {
                "run_id": self.candidate.run_id,
                "run_name": self.candidate.run_name,
                "searched": self.candidate.searched,
            },
            "n_images": self.n_images,
            "deltas": {m: asdict(d) for m, d in self.deltas.items()},
            "delong": self.delong,
            "mcnemar": self.mcnemar,
            "p_f1_holm": self.p_f1,
            "alpha": self.alpha,
            "verdict": self.verdict,
        }


def parse_candidates(text: str) -> int | None:
    """``best`` → 1, ``top-N`` → N, ``all`` → None (every run but the baseline)."""
    t = text.strip().lower()
    if t == "best":
        return 1
    if t == "all":
        return None
    if t.startswith("top-") and t[4:].isdigit() and int(t[4:]) >= 1:
        return int(t[4:])
    raise SelectionError(f"--candidates {text!r}: use best, top-N (e.g. top-3) or all")


def _matches(run: RunRow, baseline: str) -> bool:
    key, sep, want = baseline.partition("=")
    if not sep or not key.strip():
        raise SelectionError(f"--baseline {baseline!r}: give key=value, e.g. attention.lambda=1")
    have = run.params.get(key.strip())
    if have is None:
        return False
    try:
        return float(have) == float(want)
    except ValueError:
        return have == want.strip()


def _read_test(client, run: RunRow, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cache rows, labels, class probabilities) of a run's test images."""
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file
    try:
        path = client.download_artifacts(run.run_id, f"predictions/{PREDICTIONS_FILE}", str(where))
    except (MlflowException, OSError):
        raise SelectionError(
            f"run {run.run_id} ({run.run_name}) has no predictions/{PREDICTIONS_FILE}: it finished "
            "before trials stored their per-image predictions; run it again to compare it"
        ) from None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    if not rows:
        raise SelectionError(f"run {run.run_id} ({run.run_name}): its predictions hold no test images")
    classes = [k for k in rows[0] if k.startswith("p_")]
    idx = np.array([int(r["row"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r[k]) for k in classes] for r in rows])
    return idx, labels, probs


def compare_runs(
    runs: list[RunRow],
    tracking_uri: str,
    metric: str,
    *,
    baseline: str = "attention.lambda=1",
    candidates: str = "best",
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    min_images: int = MIN_TEST_IMAGES,
) -> list[Comparison]:
    """Per (task, backbone): the baseline run best on ``metric`` (validation) among those matching
    ``baseline`` (``key=value`` on the run params), against the best ``candidates`` of the others."""
    from mlflow.tracking import MlflowClient

    if n_resamples < 200:
        raise SelectionError(f"--resamples {n_resamples}: an interval needs at least 200 (2000 is usual)")
    keep = parse_candidates(candidates)
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for r in runs:
        groups.setdefault((r.params.get("data.task", "?"), r.params.get("model.backbone", "?")), []).append(r)
    client = MlflowClient(tracking_uri)
    out: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="cxr-compare-") as tmp:
        for (task, backbone), group in sorted(groups.items()):
            base_runs = [r for r in group if _matches(r, baseline)]
            others = [r for r in group if not _matches(r, baseline)]
            if not base_runs:
                raise SelectionError(
                    f"{task}/{backbone}: no finished baseline run ({baseline}) to compare against; "
                    "add one to the sweep: search: {points_to_evaluate: [{attention.lambda: 1.0}]}"
                )
            if not others:
                continue
            base = rank_runs(base_runs, metric)[0]
            chosen = rank_runs(others, metric)[:keep]
            b_idx, labels, b_probs = _read_test(client, base, Path(tmp) / base.run_id)
            if len(labels) < min_images:
                raise SelectionError(
                    f"{task}/{backbone}: {len(labels)} test images: too few for an interval "
                    f"(at least {min_images}; --min-images lowers it)"
                )
            found = []
            for cand in chosen:
                for tag in ("cxr.cache_hash",):
                    if base.tags.get(tag) and cand.tags.get(tag) and base.tags[tag] != cand.tags[tag]:
                        raise SelectionError(
                            f"{cand.run_name} and the baseline {base.run_name} were tested on different "
                            f"datasets (cache hash {cand.tags[tag][:12]} vs {base.tags[tag][:12]})"
                        )
                c_idx, c_labels, c_probs = _read_test(client, cand, Path(tmp) / cand.run_id)
                if not (np.array_equal(c_idx, b_idx) and np.array_equal(c_labels, labels)):
                    raise SelectionError(
                        f"{cand.run_name} and the baseline {base.run_name} were tested on different "
                        "images: a paired comparison needs the same test set"
                    )
                deltas = paired_bootstrap(labels, b_probs, c_probs, n_resamples=n_resamples, seed=seed)
                right_b, right_c = b_probs.argmax(1) == labels, c_probs.argmax(1) == labels
                only_b, only_c, p_mc = mcnemar_exact(right_b, right_c)
                dl = None
                if b_probs.shape[1] == 2 and min(int((labels == 1).sum()), int((labels == 0).sum())) >= 2:
                    a_auc, c_auc, z, p = delong(labels == 1, b_probs[:, 1], c_probs[:, 1])
                    dl = {"auc_baseline": a_auc, "auc_candidate": c_auc, "z": z, "p": p}
                found.append(
                    Comparison(
                        task,
                        backbone,
                        base,
                        cand,
                        len(labels),
                        deltas,
                        dl,
                        {"only_baseline_right": only_b, "only_candidate_right": only_c, "p": p_mc},
                        alpha=alpha,
                    )
                )
            for comp, p in zip(found, holm([c.deltas["f1_macro"].p for c in found]), strict=True):
                comp.p_f1 = p
            out.extend(found)
    if not out:
        raise SelectionError(f"no run besides the baseline ({baseline}) to compare")
    return out


# ---- files ----------------------------------------------------------------------------------------
def _fmt_delta(d: Delta) -> str:
    return f"{d.delta:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def _markdown(comparisons: list[Comparison], n_resamples: int, seed: int) -> str:
    lines = [
        "# Attention loss against the cross-entropy baseline",
        "",
        f"Test set differences, candidate − baseline, each with a 95 % paired, stratified bootstrap "
        f"interval ({n_resamples} resamples, seed {seed}); p of ΔF1 from the bootstrap, Holm-adjusted "
        "over the candidates of a baseline; DeLong's test for ΔAUC; the exact McNemar test for "
        "accuracy. Runs were chosen on validation.",
        "",
    ]
    for c in comparisons:
        lines += [
            f"## {c.task} / {c.backbone}: {c.candidate.run_name} vs {c.baseline.run_name}",
            "",
            f"**{c.verdict}** ({c.n_images} test images)",
            "",
            "| Metric | baseline | candidate | Δ [95 % CI] | p (bootstrap, unadjusted) |",
            "|---|---:|---:|---:|---:|",
        ]
        for m, d in c.deltas.items():
            lines.append(
                f"| {metric_label(m)} | {d.baseline:.3f} | {d.candidate:.3f} | {_fmt_delta(d)} | {d.p:.2g} |"
            )
        if c.delong:
            lines.append(f"\nDeLong ΔAUC: z = {c.delong['z']:+.2f}, p = {c.delong['p']:.2g}.")
        mc = c.mcnemar
        lines.append(
            f"McNemar (accuracy): {mc['only_baseline_right']} images only the baseline got right, "
            f"{mc['only_candidate_right']} only the candidate, exact p = {mc['p']:.2g}.\n"
        )
    return "\n".join(lines)


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def _latex(comparisons: list[Comparison]) -> str:
    out = [r"% generated by cxr-sweep compare: candidate − baseline on the test set, 95 % bootstrap CI"]
    for c in comparisons:
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex_escape(c.task)}/{_tex_escape(c.backbone)}: "
            rf"{_tex_escape(c.candidate.run_name)} vs {_tex_escape(c.baseline.run_name)}}}",
            r"\begin{tabular}{lccc}",
            r"\hline",
            r"Metric & baseline & candidate & $\Delta$ [95\% CI] \\",
            r"\hline",
        ]
        for m, d in c.deltas.items():
            out.append(
                f"{_tex_escape(metric_label(m))} & {d.baseline:.3f} & {d.candidate:.3f} & "
                f"${d.delta:+.3f}$ [${d.low:+.3f}$, ${d.high:+.3f}$] \\\\"
            )
        out += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def write_comparison(
    comparisons: list[Comparison], out_dir: Path, n_resamples: int, seed: int
) -> dict[str, Path]:
    """``compare.json``, ``compare.md`` and ``compare.tex`` in ``out_dir``; each written whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "compare.json": json.dumps(
            {"n_resamples": n_resamples, "seed": seed, "comparisons": [c.to_dict() for c in comparisons]},
            indent=2,
        ),
        "compare.md": _markdown(comparisons, n_resamples, seed),
        "compare.tex": _latex(comparisons),
    }
    files = {}
    for name, text in texts.items():
        tmp = out_dir / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
        files[name] = out_dir / name
    return files
