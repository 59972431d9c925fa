"""Does the attention loss beat cross-entropy here? The best attention configuration(s), chosen on
validation, against the CE baseline of the same task and backbone, on the same test images.

Every number comes from the runs' stored per-image predictions (``predictions/predictions.csv``,
written by every finished trial): Δ of macro F1, Youden's index, DP, accuracy and AUC with a 95 %
paired, stratified bootstrap interval; DeLong's test for ΔAUC (binary tasks); the exact McNemar
test for accuracy; Holm's correction when several candidates face one baseline. Test data is
only compared, never used to choose: baseline and candidates are picked on validation.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.metrics import metric_label

from ..tracking.lookup import RunRow, SelectionError
from .select import rank_runs
from .stats import BOOTSTRAP_METRICS, Delta, delong, holm, mcnemar_exact, paired_bootstrap, paired_seeds
from .stored import load_test_predictions

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
    # seed repeats: per metric, seed i against seed i (stats.paired_seeds); DeLong and McNemar per pair
    seeds: dict[str, dict[str, float]] = field(default_factory=dict)
    seed_pairs: list[dict[str, Any]] = field(default_factory=list)
    p_f1_seeds: float = math.nan  # the paired test across seeds of ΔF1, after Holm

    @property
    def significant(self) -> bool:
        """ΔF1 significant at ``alpha`` over the test images and, with repeats, across seeds too."""
        return self.p_f1 < self.alpha and (not self.seeds or self.p_f1_seeds < self.alpha)

    @property
    def verdict(self) -> str:
        d = self.deltas["f1_macro"]
        word = "significant" if self.significant else "not significant"
        text = f"{self.candidate.run_name}: ΔF1 {d.delta:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        text += f", p = {self.p_f1:.2g}"
        if self.seeds:
            f1 = self.seeds["f1_macro"]
            p = f"{self.p_f1_seeds:.2g}" if math.isfinite(self.p_f1_seeds) else "n/a (no spread to test)"
            text += f"; across {f1['n_seeds']} seeds p = {p}"
        return f"{text}: {word} at {self.alpha:g}"

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
            "seeds": self.seeds or None,
            "seed_pairs": self.seed_pairs or None,
            "p_f1_seeds_holm": self.p_f1_seeds if self.seeds else None,
            "significant": self.significant,
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


def _across_seeds(base: list[RunRow], cand: list[RunRow]) -> dict[str, dict[str, float]]:
    """Per metric of the bootstrap, the paired test of seed i against seed i (their logged test values)."""
    out = {}
    for m in BOOTSTRAP_METRICS:
        a = [r.metrics.get(f"test_{m}", math.nan) for r in base]
        b = [r.metrics.get(f"test_{m}", math.nan) for r in cand]
        out[m] = paired_seeds(a, b)
    return out


def _pair_tests(labels: np.ndarray, b_probs: np.ndarray, c_probs: np.ndarray):
    """McNemar on accuracy and (binary tasks with both classes) DeLong on AUC, for one pair of runs."""
    right_b, right_c = b_probs.argmax(1) == labels, c_probs.argmax(1) == labels
    only_b, only_c, p_mc = mcnemar_exact(right_b, right_c)
    dl = None
    if b_probs.shape[1] == 2 and min(int((labels == 1).sum()), int((labels == 0).sum())) >= 2:
        a_auc, c_auc, z, p = delong(labels == 1, b_probs[:, 1], c_probs[:, 1])
        dl = {"auc_baseline": a_auc, "auc_candidate": c_auc, "z": z, "p": p}
    return dl, {"only_baseline_right": only_b, "only_candidate_right": only_c, "p": p_mc}


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
            b_idx, labels, b_probs, b_seeds = load_test_predictions(client, base, Path(tmp) / base.run_id)
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
                c_idx, c_labels, c_probs, c_seeds = load_test_predictions(
                    client, cand, Path(tmp) / cand.run_id
                )
                if not (np.array_equal(c_idx, b_idx) and np.array_equal(c_labels, labels)):
                    raise SelectionError(
                        f"{cand.run_name} and the baseline {base.run_name} were tested on different "
                        "images: a paired comparison needs the same test set"
                    )
                if bool(b_seeds) != bool(c_seeds):
                    raise SelectionError(
                        f"{cand.run_name} and the baseline {base.run_name}: one was trained with seed "
                        "repeats and the other was not; compare runs of one sweep (or of sweeps with "
                        "the same repeats)"
                    )
                deltas = paired_bootstrap(labels, b_probs, c_probs, n_resamples=n_resamples, seed=seed)
                comp = Comparison(task, backbone, base, cand, len(labels), deltas, None, {}, alpha=alpha)
                if b_seeds:  # seed i against seed i: the spread over seeds, and each pair's own tests
                    comp.seeds = _across_seeds(b_seeds, c_seeds)
                    for i, cs in enumerate(c_seeds[: len(b_seeds)]):
                        dl, mc = _pair_tests(labels, b_probs[i], c_probs[i])
                        which = cs.params.get("train.seed", str(i))
                        comp.seed_pairs.append({"seed": which, "delong": dl, "mcnemar": mc})
                    comp.delong, comp.mcnemar = comp.seed_pairs[0]["delong"], comp.seed_pairs[0]["mcnemar"]
                else:
                    comp.delong, comp.mcnemar = _pair_tests(labels, b_probs, c_probs)
                found.append(comp)
            for comp, p in zip(found, holm([c.deltas["f1_macro"].p for c in found]), strict=True):
                comp.p_f1 = p
            if any(c.seeds for c in found):
                across = holm([c.seeds["f1_macro"]["p"] for c in found])
                for comp, p in zip(found, across, strict=True):
                    comp.p_f1_seeds = p
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
        if c.seeds:
            lines += _seed_lines(c)
            continue
        if c.delong:
            lines.append(f"\nDeLong ΔAUC: z = {c.delong['z']:+.2f}, p = {c.delong['p']:.2g}.")
        mc = c.mcnemar
        lines.append(
            f"McNemar (accuracy): {mc['only_baseline_right']} images only the baseline got right, "
            f"{mc['only_candidate_right']} only the candidate, exact p = {mc['p']:.2g}.\n"
        )
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def _seed_lines(c: Comparison) -> list[str]:
    """Seed repeats: mean ± std over seeds, the paired test across seeds, each seed pair's tests."""
    n = c.seeds["f1_macro"]["n_seeds"]
    lines = [
        "",
        f"Both were trained with {n} seeds: the bootstrap above scores the mean over seeds on each "
        f"resample. Seed i against seed i ({n} pairs, paired t-test on the logged test values):",
        "",
        "| Metric | baseline mean ± std | candidate mean ± std | Δ mean ± std | p (paired t) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, s in c.seeds.items():
        p = f"{s['p']:.2g}" if math.isfinite(s["p"]) else "n/a"
        lines.append(
            f"| {metric_label(m)} | {_pm(s['baseline_mean'], s['baseline_std'])} | "
            f"{_pm(s['candidate_mean'], s['candidate_std'])} | {_pm(s['delta_mean'], s['delta_std'])} | {p} |"
        )
    lines.append("")
    for pair in c.seed_pairs:
        mc, dl = pair["mcnemar"], pair["delong"]
        text = f"- seed {pair['seed']}: McNemar {mc['only_baseline_right']} vs {mc['only_candidate_right']}"
        text += f" images right only by one, exact p = {mc['p']:.2g}"
        if dl:
            text += f"; DeLong ΔAUC z = {dl['z']:+.2f}, p = {dl['p']:.2g}"
        lines.append(text)
    lines.append("")
    return lines


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
