"""cxr-attention-sweeps trainer: one trial of a localization-aware chest X-ray classifier.

A plain library (no Ray, Optuna or MLflow imports): config, dataset cache, backbones,
Grad-CAM, attention loss, metrics and the training loop behind :func:`run_trial`.
"""

from .config import ConfigError, TrialConfig, load_config
from .loop import run_trial

__all__ = ["ConfigError", "TrialConfig", "load_config", "run_trial"]
__version__ = "0.1.0"
