"""Named trial-config presets: a set of defaults that ``preset: NAME`` puts under a config.

What the config gives explicitly wins over the preset. ``paper`` trains the way the authors'
public script does (docs/paper-fidelity.md lists every decision next to ours).
"""

from __future__ import annotations

import copy
from typing import Any

from ._registry import Registry

__all__ = ["PRESETS", "apply_preset"]

PRESETS: Registry[dict[str, Any]] = Registry("config preset")


@PRESETS.register("paper")
def _paper() -> dict[str, Any]:
    """The authors' training: Adam 1e-5, 100 epochs, ReduceLROnPlateau on the validation loss
    (factor 0.1, patience 10, min_lr 1e-10), a stop after 30 non-improving epochs in total, the
    checkpoint of the best validation accuracy, 224 px, the hard-count loss without gradient on an
    eval-mode Grad-CAM of the predicted class."""
    return {
        "model": {"image_size": 224},
        "train": {
            "epochs": 100,
            "batch_size": 32,
            "optimizer": "adam",
            "lr": 1e-5,
            "weight_decay": 0.0,
            "plateau_on": "val_loss",
            "plateau_factor": 0.1,
            "plateau_patience": 10,
            "plateau_min_lr": 1e-10,
            "early_stop": "total",
            "early_stop_patience": 30,
            "selection_metric": "val_accuracy",
        },
        "attention": {"mode": "paper", "cam_target": "predicted", "cam_pass": "eval", "cam_score": "logit"},
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the defaults of its ``preset`` underneath (unknown names list the valid ones)."""
    name = raw.get("preset")
    if not name:
        return raw
    return _merge(PRESETS.create(name), raw)
