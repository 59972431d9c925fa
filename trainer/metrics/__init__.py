"""Metrics of the CXR sweeps: classification (binary and multi-class), localization, and the one
table of every logged name with its label and direction.

- :mod:`.classification` — :func:`compute_metrics` (DESIGN.md §5: every name of
  :data:`METRIC_NAMES` plus ``youden_threshold`` and ``youden_index_optimal``).
- :mod:`.localization` — where the Grad-CAM points (:class:`LocalizationScores`).
- :mod:`.names` — :data:`METRICS`: label, short header and direction of every logged metric;
  :func:`higher_is_better`, :func:`evaluation_metric_names`, :func:`metric_label`.

Selection, reports and the command line read these lists: a new metric is computed in one module
here and named in :mod:`.names`.
"""

from ..lazy import lazy_exports
from .names import (
    LOCALIZATION_METRICS,
    METRIC_LABELS,
    METRIC_NAMES,
    METRICS,
    Metric,
    UnknownMetricError,
    base_name,
    check_metric,
    evaluation_metric_names,
    higher_is_better,
    logged_names,
    metric_label,
)

__all__ = [
    "LOCALIZATION_METRICS",
    "METRICS",
    "METRIC_LABELS",
    "METRIC_NAMES",
    "LocalizationScores",
    "Metric",
    "UnknownMetricError",
    "base_name",
    "cam_in_region",
    "check_metric",
    "compute_metrics",
    "discriminant_power",
    "evaluation_metric_names",
    "higher_is_better",
    "logged_names",
    "metric_label",
    "pointing_hits",
    "pointing_tolerance",
    "youden_index",
]

# the computations load on first use: a config check reads names and directions only (.names),
# and need not import scikit-learn and PyTorch
_WHERE = {
    **dict.fromkeys(
        ("compute_metrics", "discriminant_power", "youden_index"), "trainer.metrics.classification"
    ),
    **dict.fromkeys(
        ("LocalizationScores", "cam_in_region", "pointing_hits", "pointing_tolerance"),
        "trainer.metrics.localization",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
