"""Paired comparisons of two classifiers on the same test images: bootstrap intervals, DeLong's
test for ΔAUC, the exact McNemar test for accuracy, Holm's correction.

The bootstrap is paired (both runs are scored on the same resampled images) and stratified (each
resample keeps the class counts of the test set). Its metrics are vectorised over resamples and
follow :func:`trainer.metrics.compute_metrics` to the letter (binary: class 1 is positive;
multi-class: one-vs-rest macro means; discriminant power with the Haldane-Anscombe correction;
AUC over the classes present), so the point estimate on the full set is the logged metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "BOOTSTRAP_METRICS",
    "Delta",
    "bootstrap_intervals",
    "bootstrap_metrics",
    "delong",
    "holm",
    "mcnemar_exact",
    "paired_bootstrap",
    "paired_seeds",
    "stratified_indices",
]

BOOTSTRAP_METRICS = ("f1_macro", "youden_index", "discriminant_power", "accuracy", "auc")
_DP_SCALE = math.sqrt(3.0) / math.pi


@dataclass(frozen=True)
class Delta:
    """candidate − baseline for one metric: the estimate, its 95 % interval and a two-sided p."""

    metric: str
    baseline: float
    candidate: float
    delta: float
    low: float
    high: float
    p: float


def stratified_indices(labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, N)`` row indices: each row draws, with replacement, as many images of each
    class as the test set has (so every resample has every class the test set has)."""
    rng = np.random.default_rng(seed)
    parts = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        parts.append(members[rng.integers(0, len(members), size=(n_resamples, len(members)))])
    return np.concatenate(parts, axis=1)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _auc(is_pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row of ``(B, N)`` arrays (average ranks for ties); NaN where a row
    lacks positives or negatives."""
    ranks = stats.rankdata(score, axis=1)  # (B, N), ties get their mean rank
    n_pos = is_pos.sum(axis=1).astype(np.float64)
    n_neg = is_pos.shape[1] - n_pos
    rank_sum = (ranks * is_pos).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_metrics(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every contract metric (``METRIC_NAMES``; :data:`BOOTSTRAP_METRICS` are those compared) of each
    resample ``idx`` (``(B, N)`` rows into ``labels``/``probs``), each ``(B,)``, computed as
    :func:`trainer.metrics.compute_metrics` computes them."""
    n_classes = probs.shape[1]
    y = labels[idx]  # (B, N)
    pred = probs.argmax(axis=1)[idx]  # (B, N)
    b, n = y.shape
    flat = (np.arange(b)[:, None] * n_classes * n_classes + y * n_classes + pred).ravel()
    cm = np.bincount(flat, minlength=b * n_classes * n_classes).reshape(b, n_classes, n_classes)
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)  # (B, C)
    fn = cm.sum(axis=2) - tp
    fp = cm.sum(axis=1) - tp
    tn = n - tp - fn - fp
    sens, spec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    zero = (tp == 0) | (fn == 0) | (fp == 0) | (tn == 0)  # Haldane-Anscombe: +0.5 to such tables
    c_tp, c_fn, c_fp, c_tn = (a + 0.5 * zero for a in (tp, fn, fp, tn))
    c_sens, c_spec = c_tp / (c_tp + c_fn), c_tn / (c_tn + c_fp)
    dp = _DP_SCALE * (np.log10(c_sens / (1 - c_sens)) + np.log10(c_spec / (1 - c_spec)))
    prec = _safe_div(tp, tp + fp)  # zero_division=0, as scikit-learn is called in the trainer
    ovr = {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": prec,
        "npv": _safe_div(tn, tn + fn),
        "fdr": _safe_div(fp, fp + tp),
        "for": _safe_div(fn, fn + tn),
        "discriminant_power": dp,
    }
    if n_classes == 2:  # the positive class
        one = {k: v[:, 1] for k, v in ovr.items()}
        auc = _auc(y == 1, probs[:, 1][idx])
        auc = np.where(np.isnan(auc), 0.5, auc)
    else:  # macro over the classes; AUC over the classes present in each resample
        one = {k: v.mean(axis=1) for k, v in ovr.items()}
        per_class = np.stack([_auc(y == k, probs[:, k][idx]) for k in range(n_classes)], axis=1)
        present = ~np.isnan(per_class)  # a class with positives and negatives in the resample
        total = np.where(present, per_class, 0.0).sum(axis=1)
        auc = np.where(present.any(axis=1), _safe_div(total, present.sum(axis=1).astype(np.float64)), 0.5)
    weight = (tp + fn) / n  # each class's share of the images: scikit-learn's "weighted"
    return {
        "accuracy": np.trace(cm, axis1=1, axis2=2) / n,
        "precision_macro": prec.mean(axis=1),
        "precision_weighted": (prec * weight).sum(axis=1),
        "recall_macro": sens.mean(axis=1),
        "recall_weighted": (sens * weight).sum(axis=1),
        "f1_macro": f1.mean(axis=1),
        "f1_weighted": (f1 * weight).sum(axis=1),
        "auc": auc,
        **one,
        "youden_index": one["sensitivity"] + one["specificity"] - 1.0,
    }


def paired_bootstrap(
    labels: np.ndarray,
    baseline: np.ndarray,
    candidate: np.ndarray,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Delta]:
    """Δ = candidate − baseline of each of :data:`BOOTSTRAP_METRICS`, with a percentile interval
    over paired, stratified resamples and a two-sided p from the bootstrap distribution centred
    on its estimate: the share of resampled Δ at least as far from Δ̂ as Δ̂ is from 0.

    ``baseline`` / ``candidate``: probabilities ``(n, C)``, or ``(k, n, C)`` for k seeds of one
    configuration: a metric is then the mean over its seeds, each seed scored on the same resample.
    """
    labels = np.asarray(labels)
    everything = np.arange(len(labels))[None]  # the test set itself: the point estimates
    full_a, full_b = _seed_mean(labels, baseline, everything), _seed_mean(labels, candidate, everything)
    idx = stratified_indices(labels, n_resamples, seed)
    boot_a, boot_b = _seed_mean(labels, baseline, idx), _seed_mean(labels, candidate, idx)
    tail = (1.0 - level) / 2 * 100
    out = {}
    for m in BOOTSTRAP_METRICS:
        est = float(full_b[m][0] - full_a[m][0])
        boot = boot_b[m] - boot_a[m]
        low, high = np.percentile(boot, [tail, 100 - tail])
        extreme = int(np.sum(np.abs(boot - est) >= abs(est) - 1e-12))
        p = 1.0 if est == 0 else min(1.0, (1 + extreme) / (1 + n_resamples))
        out[m] = Delta(m, float(full_a[m][0]), float(full_b[m][0]), est, float(low), float(high), p)
    return out


def _seed_mean(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`bootstrap_metrics` of one run ``(n, C)``, or the mean over seeds of ``(k, n, C)``."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        return bootstrap_metrics(labels, probs, idx)
    per_seed = [bootstrap_metrics(labels, p, idx) for p in probs]
    return {m: np.mean([s[m] for s in per_seed], axis=0) for m in per_seed[0]}


def bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """A percentile interval over stratified resamples of the test images for every contract metric
    of one run ``(n, C)`` (or of the mean over seeds, ``(k, n, C)``)."""
    labels = np.asarray(labels)
    values = _seed_mean(labels, probs, stratified_indices(labels, n_resamples, seed))
    tail = (1.0 - level) / 2 * 100
    out = {}
    for m, v in values.items():
        low, high = np.percentile(v, [tail, 100 - tail])
        out[m] = (float(low), float(high))
    return out


def paired_seeds(baseline: list[float], candidate: list[float]) -> dict[str, float]:
    """Seed i of the candidate against seed i of the baseline: mean ± std of each, the mean Δ and
    the paired t-test's two-sided p (NaN with fewer than two pairs or no spread in Δ)."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    d = b - a
    p = t = math.nan
    if n >= 2 and np.std(d) > 0:
        res = stats.ttest_rel(b, a)
        t, p = float(res.statistic), float(res.pvalue)

    def sd(x: np.ndarray) -> float:
        return float(np.std(x, ddof=1)) if n >= 2 else math.nan

    return {
        "n_seeds": n,
        "baseline_mean": float(a.mean()),
        "baseline_std": sd(a),
        "candidate_mean": float(b.mean()),
        "candidate_std": sd(b),
        "delta_mean": float(d.mean()),
        "delta_std": sd(d),
        "t": t,
        "p": p,
    }


def delong(is_pos: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> tuple[float, float, float, float]:
    """DeLong's test of two correlated AUCs on the same images (the fast form of Sun & Xu 2014):
    (AUC a, AUC b, z of b − a, two-sided p)."""
    pos, neg = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative images (got {m} and {n})")
    aucs, v10, v01 = [], [], []
    for s in (score_a, score_b):
        tx, ty, tz = (
            stats.rankdata(s[pos]),
            stats.rankdata(s[neg]),
            stats.rankdata(np.concatenate([s[pos], s[neg]])),
        )
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per positive: share of negatives it beats
        v01.append(1.0 - (tz[m:] - ty) / m)  # per negative: share of positives that beat it
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = aucs[1] - aucs[0]
    if var <= 0:
        return float(aucs[0]), float(aucs[1]), 0.0, 1.0
    z = diff / math.sqrt(var)
    return float(aucs[0]), float(aucs[1]), float(z), float(2 * stats.norm.sf(abs(z)))


def mcnemar_exact(right_a: np.ndarray, right_b: np.ndarray) -> tuple[int, int, float]:
    """The exact McNemar test on paired correct/incorrect outcomes: (b = only a right, c = only b
    right, two-sided p of the binomial test of b against b + c at 1/2)."""
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (a NaN, a test that could not be
    made, stays NaN and does not count among the tests)."""
    finite = [i for i, p in enumerate(pvalues) if math.isfinite(p)]
    order = sorted(finite, key=lambda i: pvalues[i])
    m = len(finite)
    adjusted = np.full(len(pvalues), np.nan)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return [float(v) for v in adjusted]
