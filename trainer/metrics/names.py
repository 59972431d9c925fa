"""Every metric a trial logs, in one table: how reports and tables name it, and which way is better.

A logged name is a split prefix (``train_``, ``val_``, ``test_``, ``best_val_``) and one of the
names below, or one of the per-epoch bookkeeping keys (``lr``, ``lambda``, ``epoch_time_s``...).
Selection (the best epoch of a trial, ReduceLROnPlateau's mode, ranking runs, the sweep metric's
mode) reads its direction from :func:`higher_is_better`, which refuses a name it does not know and
a name that is not a score: nothing guesses a direction from a name's spelling.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import UserError

__all__ = [
    "LOCALIZATION_METRICS",
    "METRICS",
    "METRIC_LABELS",
    "METRIC_NAMES",
    "OUTSIDE_METRICS",
    "Metric",
    "UnknownMetricError",
    "base_name",
    "check_metric",
    "evaluation_metric_names",
    "higher_is_better",
    "logged_names",
    "metric_label",
]

#: The 16 contract metric names (DESIGN.md §5), in reporting order.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy", "precision_macro", "precision_weighted", "recall_macro", "recall_weighted",
    "f1_macro", "f1_weighted", "auc", "sensitivity", "specificity", "ppv", "npv", "fdr", "for",
    "youden_index", "discriminant_power",
)  # fmt: skip

#: Where the Grad-CAM points, scored against ground-truth lesion masks (logged where they are known).
LOCALIZATION_METRICS: tuple[str, ...] = ("pointing_game", "cam_in_region")

#: What the decision reads outside the lungs (trainer/outside.py), logged unless ``outside.score`` is off.
OUTSIDE_METRICS: tuple[str, ...] = (
    "outside_evidence", "outside_dependence", "inside_only_accuracy", "inside_only_f1_macro"
)  # fmt: skip

#: Logged beside the contract metrics for validation and test: the Youden-optimal threshold and
#: index, the training objective and its two parts, and the CAM share inside the prior region.
_EXTRA_NAMES: tuple[str, ...] = (
    "youden_threshold", "youden_index_optimal", "loss", "ce", "attention_loss", "cam_in_prior"
)  # fmt: skip

#: What a training pass logs (``train_*``), and the keys logged without a split prefix.
_TRAIN_NAMES: tuple[str, ...] = (
    "loss",
    "ce",
    "attention_loss",
    "accuracy",
    "cam_zero_fraction",
    "grad_ratio",
)
_PLAIN_NAMES: tuple[str, ...] = ("epoch", "lambda", "lr", "epoch_time_s", "epoch_train_s", "epoch_val_s")
_PLAIN_NAMES += ("best_epoch", "epochs_run")

SPLIT_PREFIXES = ("best_val_", "val_", "test_", "train_")


@dataclass(frozen=True)
class Metric:
    """How a metric is shown and which way is better (``None``: not a score, never selected on)."""

    label: str  # in reports
    short: str  # in table headers
    higher_is_better: bool | None


_UP, _DOWN, _NONE = True, False, None

#: Every metric and bookkeeping key a trial logs, without the split prefix.
METRICS: dict[str, Metric] = {
    "accuracy": Metric("Accuracy", "acc", _UP),
    "precision_macro": Metric("Precision (macro)", "prec", _UP),
    "precision_weighted": Metric("Precision (weighted)", "prec w", _UP),
    "recall_macro": Metric("Recall (macro)", "recall", _UP),
    "recall_weighted": Metric("Recall (weighted)", "recall w", _UP),
    "f1_macro": Metric("F1 (macro)", "F1", _UP),
    "f1_weighted": Metric("F1 (weighted)", "F1 w", _UP),
    "auc": Metric("AUC", "AUC", _UP),
    "sensitivity": Metric("Sensitivity", "sens", _UP),
    "specificity": Metric("Specificity", "spec", _UP),
    "ppv": Metric("PPV", "PPV", _UP),
    "npv": Metric("NPV", "NPV", _UP),
    "fdr": Metric("FDR", "FDR", _DOWN),
    "for": Metric("FOR", "FOR", _DOWN),
    "youden_index": Metric("Youden's index", "YI", _UP),
    "discriminant_power": Metric("DP", "DP", _UP),
    "youden_threshold": Metric("Youden-optimal threshold", "YI thr", _NONE),
    "youden_index_optimal": Metric("Youden's index at its optimal threshold", "YI opt", _UP),
    "loss": Metric("Loss (λ·CE + (1−λ)·L_att)", "loss", _DOWN),
    "ce": Metric("Cross-entropy", "CE", _DOWN),
    "attention_loss": Metric("Attention loss", "L_att", _DOWN),
    "cam_in_prior": Metric("CAM in prior", "CAM prior", _UP),
    "pointing_game": Metric("Pointing game", "pointing", _UP),
    "cam_in_region": Metric("CAM in lesion", "CAM in", _UP),
    "outside_evidence": Metric("Outside evidence (P drop, lungs only)", "outside", _DOWN),
    "outside_dependence": Metric("Outside dependence (|P change|, lungs only)", "outside |Δ|", _DOWN),
    "inside_only_accuracy": Metric("Accuracy on lung-only images", "acc lungs", _UP),
    "inside_only_f1_macro": Metric("F1 (macro) on lung-only images", "F1 lungs", _UP),
    "cam_zero_fraction": Metric("Share of all-zero CAMs", "CAM 0", _DOWN),
    "grad_ratio": Metric("‖∇L_att‖ / ‖∇CE‖", "∇ ratio", _NONE),
    "lambda": Metric("λ", "λ", _NONE),
    "lr": Metric("Learning rate", "lr", _NONE),
    "epoch": Metric("Epoch (from 0)", "epoch", _NONE),
    "best_epoch": Metric("Best epoch (from 0)", "best", _NONE),
    "epochs_run": Metric("Epochs run", "epochs", _NONE),
    "epoch_time_s": Metric("Epoch (s)", "epoch s", _DOWN),
    "epoch_train_s": Metric("Training pass (s)", "train s", _DOWN),
    "epoch_val_s": Metric("Validation pass (s)", "val s", _DOWN),
}

#: (report label, short table header) of every metric.
METRIC_LABELS: dict[str, tuple[str, str]] = {k: (m.label, m.short) for k, m in METRICS.items()}


class UnknownMetricError(UserError):
    """A metric name that no trial logs, or one that is not a score; the message suggests near misses."""


def base_name(name: str) -> str:
    """``name`` without its split prefix (``val_fdr`` → ``fdr``; one prefix at most)."""
    for prefix in SPLIT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def logged_names(prefix: str = "", lesions_known: bool = True) -> list[str]:
    """Every name a trial logs under split ``prefix`` (``""``: the keys without one)."""
    if prefix in ("val_", "test_", "best_val_"):
        names = evaluation_metric_names(lesions_known)
    else:
        names = list(_TRAIN_NAMES if prefix == "train_" else _PLAIN_NAMES)
    return [prefix + n for n in names]


def check_metric(name: str, valid: list[str], what: str = "a metric a trial logs") -> None:
    """Raise :class:`UnknownMetricError` unless ``name`` is in ``valid``, naming the nearest ones."""
    if name in valid:
        return
    scored = [v for v in valid if METRICS[base_name(v)].higher_is_better is not None]
    near = [v for v in scored if v.startswith(name)][:3] or difflib.get_close_matches(name, scored, n=3)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    raise UnknownMetricError(f"{name!r} is not {what}{hint} (valid: {', '.join(scored)})")


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` (split prefix allowed) is better.

    Raises :class:`UnknownMetricError` for a name no trial logs and for one without a direction
    (``lr``, ``lambda``, ``youden_threshold``...).
    """
    prefix = name[: len(name) - len(base_name(name))]
    check_metric(name, logged_names(prefix) if prefix else list(METRICS))  # a bare name: of any split
    direction = METRICS[base_name(name)].higher_is_better
    if direction is None:
        raise UnknownMetricError(f"{name!r} is not a score: it has no better direction to select on")
    return direction


def evaluation_metric_names(lesions_known: bool) -> list[str]:
    """The names a validation or test pass logs (no prefix); localization ones need lesion masks."""
    return [
        *METRIC_NAMES,
        *_EXTRA_NAMES,
        *OUTSIDE_METRICS,
        *(LOCALIZATION_METRICS if lesions_known else ()),
    ]


def metric_label(name: str, short: bool = False) -> str:
    """How a report (``short=False``) or a table header names metric ``name``."""
    labels = METRIC_LABELS.get(name)
    return name if labels is None else labels[short]
