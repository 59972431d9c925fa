"""cxr-attention-sweeps trainer: one trial of a localization-aware chest X-ray classifier.

A plain library (no Ray, Optuna or MLflow imports): config, dataset cache, backbones,
Grad-CAM, attention loss, metrics and the training loop behind :func:`run_trial`. The names
below load on first use, so importing a light module (``trainer.errors``, ``trainer.tasks``)
does not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ConfigError", "TrialConfig", "load_config", "run_trial"]
__version__ = "0.1.0"

_WHERE = {
    "ConfigError": "trainer.errors",
    "TrialConfig": "trainer.config",
    "load_config": "trainer.config",
    "run_trial": "trainer.loop",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
