"""cxr-attention-sweeps trainer: one trial of a localization-aware chest X-ray classifier.

A plain library (no Ray, Optuna or MLflow imports): config, dataset cache, backbones,
Grad-CAM, attention loss, metrics and the training loop behind :func:`run_trial`. The names
below load on first use, so importing a light module (``trainer.errors``, ``trainer.tasks``)
does not import PyTorch.
"""

from __future__ import annotations

from .lazy import lazy_exports

__all__ = ["ConfigError", "TrialConfig", "load_config", "run_trial"]
__version__ = "0.1.0"

_WHERE = {
    "ConfigError": "trainer.errors",
    "TrialConfig": "trainer.config",
    "load_config": "trainer.config",
    "run_trial": "trainer.loop",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
