"""Classification metrics: :func:`compute_metrics` turns integer labels and class probabilities
into every name of :data:`~trainer.metrics.names.METRIC_NAMES` plus ``youden_threshold`` and
``youden_index_optimal``.

Conventions (docs/metrics.md has them all): binary (C == 2): class 1 (the pathology) is positive,
class 0 (No Finding) negative. Multi-class: sensitivity, specificity, PPV, NPV, FDR and FOR are
macro means of the one-vs-rest (OvR) values; Youden index = macro sensitivity + macro
specificity - 1; discriminant power = mean of the per-class OvR values, with the Haldane-Anscombe
correction (+0.5 to every cell of a 2x2 table with a zero cell). A ratio with a zero denominator
is 0.0; AUC with one class in ``y_true`` is 0.5 (multi-class: absent classes are skipped). No
result is ever inf or NaN; invalid input raises ``ValueError``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score, roc_curve

__all__ = ["compute_metrics", "discriminant_power", "youden_index"]

# sqrt(3) / pi: scales a log odds ratio to the discriminant-power scale.
_DP_SCALE = math.sqrt(3.0) / math.pi

# Values used when a quantity is undefined because y_true holds a single class.
_CHANCE_AUC = 0.5
_DEFAULT_THRESHOLD = 0.5
# TPR - FPR values closer than this count as tied (guards against float rounding in roc_curve).
_TIE_TOLERANCE = 1e-12


def youden_index(sensitivity: Any, specificity: Any) -> Any:
    """Youden index ``YI = sensitivity + specificity - 1`` (scalar or elementwise on arrays)."""
    if np.ndim(sensitivity) == 0 and np.ndim(specificity) == 0:
        return float(sensitivity) + float(specificity) - 1.0
    return np.asarray(sensitivity, dtype=np.float64) + np.asarray(specificity, dtype=np.float64) - 1.0


def discriminant_power(sensitivity: Any, specificity: Any) -> Any:
    """Discriminant power (base-10 logs, as in the paper's tables)::

        DP = sqrt(3)/pi * (log10(sens / (1 - sens)) + log10(spec / (1 - spec)))

    which equals ``sqrt(3)/pi * log10(diagnostic odds ratio)``. Works on scalars (returns a
    float) or elementwise on arrays. Both arguments must lie strictly inside (0, 1), otherwise
    DP is infinite/undefined and a ``ValueError`` is raised; :func:`compute_metrics` avoids this
    by applying the Haldane-Anscombe correction to the confusion counts first.
    """
    sens = np.asarray(sensitivity, dtype=np.float64)
    spec = np.asarray(specificity, dtype=np.float64)
    inside = (sens > 0) & (sens < 1) & (spec > 0) & (spec < 1)  # False for NaN too
    if not np.all(inside):
        raise ValueError(
            "discriminant_power needs 0 < sensitivity < 1 and 0 < specificity < 1 "
            f"(got sensitivity={sensitivity!r}, specificity={specificity!r})"
        )
    dp = _DP_SCALE * (np.log10(sens / (1.0 - sens)) + np.log10(spec / (1.0 - spec)))
    return float(dp) if dp.ndim == 0 else dp


# --------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """np.asarray that also takes torch tensors (any device, grad, bf16) without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, duck-typed
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bf16/fp16 -> float64; numpy cannot read bf16
    return np.asarray(x, dtype=dtype)


def _validate(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels (N,) int64, probabilities (N, C) float64)`` or raise ValueError."""
    labels = _to_numpy(y_true)
    prob = _to_numpy(y_prob, dtype=np.float64)

    if labels.ndim != 1:
        raise ValueError(f"y_true must be 1-D (N,), got shape {labels.shape}")
    if prob.ndim != 2:
        raise ValueError(f"y_prob must be 2-D (N, C), got shape {prob.shape}")
    if labels.shape[0] == 0 or prob.shape[0] == 0:
        raise ValueError("compute_metrics got empty input (N == 0); metrics are undefined")
    if labels.shape[0] != prob.shape[0]:
        raise ValueError(
            f"shape mismatch: y_true has {labels.shape[0]} samples but y_prob has {prob.shape[0]}"
        )
    n_classes = prob.shape[1]
    if n_classes < 2:
        raise ValueError(f"y_prob must have at least 2 class columns, got {n_classes}")
    if not np.all(np.isfinite(prob)):
        raise ValueError("y_prob contains NaN or inf")

    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    elif labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("y_true must hold integer class labels (got non-integral values)")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    else:
        raise ValueError(f"y_true must hold integer class labels, got dtype {labels.dtype}")

    bad = (labels < 0) | (labels >= n_classes)
    if np.any(bad):
        raise ValueError(
            f"y_true has labels outside [0, {n_classes}) (C = y_prob.shape[1]): "
            f"{np.unique(labels[bad]).tolist()}"
        )
    return labels, prob


# --------------------------------------------------------------------------------------------
# building blocks


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den, 0.0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _confusion_matrix(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    flat = labels * n_classes + pred  # (N,)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ovr_counts(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class one-vs-rest (TP, FN, FP, TN), each (C,) float64, from a (C, C) confusion matrix."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)  # (C,)
    fn = cm.sum(axis=1) - tp  # true k, predicted other
    fp = cm.sum(axis=0) - tp  # predicted k, true other
    tn = cm.sum() - tp - fn - fp
    return tp, fn, fp, tn


def _ovr_discriminant_power(tp: np.ndarray, fn: np.ndarray, fp: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """Per-class DP (C,) with the Haldane-Anscombe correction on tables that contain a zero cell."""
    table = np.stack([tp, fn, fp, tn])  # (4, C)
    needs_correction = np.any(table == 0, axis=0)  # (C,)
    table = table + 0.5 * needs_correction  # +0.5 to all four cells of those classes only
    c_tp, c_fn, c_fp, c_tn = table
    sens = c_tp / (c_tp + c_fn)  # strictly inside (0, 1) now
    spec = c_tn / (c_tn + c_fp)
    return np.asarray(discriminant_power(sens, spec), dtype=np.float64)


def _binary_auc_and_youden(is_pos: np.ndarray, score: np.ndarray) -> tuple[float, float, float]:
    """(AUC, Youden-optimal threshold in [0, 1], optimal TPR - FPR) for one binary problem.

    ``is_pos`` must contain both classes. Ties in TPR - FPR (up to float rounding) resolve to the
    first ROC point, i.e. the highest threshold.
    """
    target = is_pos.astype(np.int64)  # (N,) 0/1
    auc = float(roc_auc_score(target, score))
    fpr, tpr, thresholds = roc_curve(target, score, drop_intermediate=False)
    j = tpr - fpr  # (n_thresholds,)
    best = int(np.flatnonzero(j >= j.max() - _TIE_TOLERANCE)[0])  # first (highest-threshold) maximum
    threshold = float(np.clip(thresholds[best], 0.0, 1.0))  # the first threshold may be inf
    return auc, threshold, float(j[best])


def _ranking_metrics(labels: np.ndarray, prob: np.ndarray) -> tuple[float, float, float]:
    """(AUC, youden_threshold, youden_index_optimal).

    Binary: on the class-1 score. Multi-class: mean over the OvR problems of the classes present
    in ``labels`` (absent classes are skipped). Single class present: (0.5, 0.5, 0.0).
    """
    n_classes = prob.shape[1]
    present = np.unique(labels)
    if present.size < 2:
        return _CHANCE_AUC, _DEFAULT_THRESHOLD, 0.0
    if n_classes == 2:
        return _binary_auc_and_youden(labels == 1, prob[:, 1])
    per_class = np.array([_binary_auc_and_youden(labels == k, prob[:, k]) for k in present])  # (K, 3)
    auc, threshold, j = per_class.mean(axis=0)
    return float(auc), float(threshold), float(j)


# --------------------------------------------------------------------------------------------
# public entry point


def compute_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    """Compute every metric in :data:`METRIC_NAMES` plus the Youden-optimal threshold.

    Args:
        y_true: integer labels, shape (N,), values in [0, C).
        y_prob: class probabilities, shape (N, C), C >= 2 (numpy array, torch tensor, list).
            Predictions are ``argmax(y_prob, axis=1)``.

    Returns:
        dict of plain floats, keys ``METRIC_NAMES + ("youden_threshold", "youden_index_optimal")``.
        With per-class OvR counts TP, FN, FP, TN (binary: class 1 only; multi-class: macro mean
        over all C classes)::

            sensitivity = TP / (TP + FN)      specificity = TN / (TN + FP)
            ppv         = TP / (TP + FP)      npv         = TN / (TN + FN)
            fdr         = FP / (FP + TP)      for         = FN / (FN + TN)
            youden_index       = sensitivity + specificity - 1
            discriminant_power = sqrt(3)/pi * (log10(sens/(1-sens)) + log10(spec/(1-spec)))

        DP is per class (binary: class 1; multi-class: mean of the per-class values) on counts
        with the Haldane-Anscombe correction when a cell is zero. Zero denominators give 0.0.

    Raises:
        ValueError: empty input, shape mismatch, labels outside [0, C), non-finite y_prob.
    """
    labels, prob = _validate(y_true, y_prob)  # (N,), (N, C)
    n_classes = prob.shape[1]
    pred = np.argmax(prob, axis=1)  # (N,)
    class_ids = list(range(n_classes))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        accuracy = float(accuracy_score(labels, pred))
        averaged = {
            average: precision_recall_fscore_support(
                labels, pred, labels=class_ids, average=average, zero_division=0
            )[:3]
            for average in ("macro", "weighted")
        }
        auc, youden_threshold, youden_optimal = _ranking_metrics(labels, prob)

    cm = _confusion_matrix(labels, pred, n_classes)  # (C, C)
    tp, fn, fp, tn = _ovr_counts(cm)  # each (C,)
    per_class = {
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "ppv": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "fdr": _safe_div(fp, fp + tp),
        "for": _safe_div(fn, fn + tn),
        "discriminant_power": _ovr_discriminant_power(tp, fn, fp, tn),
    }  # each (C,)
    if n_classes == 2:
        summary = {name: float(values[1]) for name, values in per_class.items()}  # positive class
    else:
        summary = {name: float(values.mean()) for name, values in per_class.items()}  # macro

    precision_macro, recall_macro, f1_macro = averaged["macro"]
    precision_weighted, recall_weighted, f1_weighted = averaged["weighted"]
    result = {
        "accuracy": accuracy,
        "precision_macro": float(precision_macro),
        "precision_weighted": float(precision_weighted),
        "recall_macro": float(recall_macro),
        "recall_weighted": float(recall_weighted),
        "f1_macro": float(f1_macro),
        "f1_weighted": float(f1_weighted),
        "auc": auc,
        "sensitivity": summary["sensitivity"],
        "specificity": summary["specificity"],
        "ppv": summary["ppv"],
        "npv": summary["npv"],
        "fdr": summary["fdr"],
        "for": summary["for"],
        "youden_index": youden_index(summary["sensitivity"], summary["specificity"]),
        "discriminant_power": summary["discriminant_power"],
        "youden_threshold": youden_threshold,
        "youden_index_optimal": youden_optimal,
    }
    return result
