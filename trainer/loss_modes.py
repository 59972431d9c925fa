"""What the configuration knows of each attention-loss mode, without PyTorch.

A mode's properties (whether its value carries a gradient, which attention settings it reads) decide
config checks, MLflow params and the sweep tables; its computation lives in
:mod:`trainer.attention_loss`, which registers every mode named here (and can register more: those
are looked up there once it is loaded). Reading a config or a sweep's status needs only this table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ._registry import UnknownNameError

__all__ = ["BUILTIN_MODES", "ModeInfo", "mode_info", "mode_names"]


@dataclass(frozen=True)
class ModeInfo:
    name: str
    differentiable: bool  # L_att carries a gradient to the model (else the update is λ·∇CE only)
    uses: frozenset[str]  # the attention settings it reads besides CAM and region
    input_gradient: bool = False  # scores the input gradient, not a Grad-CAM (cam_* settings unused)


BUILTIN_MODES: dict[str, ModeInfo] = {
    "paper": ModeInfo("paper", differentiable=False, uses=frozenset({"threshold"})),
    "soft": ModeInfo("soft", differentiable=True, uses=frozenset({"threshold", "tau"})),
    "energy": ModeInfo("energy", differentiable=True, uses=frozenset()),
    "input_grad": ModeInfo(
        "input_grad", differentiable=True, uses=frozenset({"input_region"}), input_gradient=True
    ),
}


def _registry():
    """The loss registry when :mod:`trainer.attention_loss` is loaded (a mode beyond the built-in
    ones can only have been registered there), else None: nothing here imports PyTorch."""
    module = sys.modules.get("trainer.attention_loss")
    return module.LOSS_MODES if module is not None else None


def mode_info(name: str) -> ModeInfo:
    """The properties of mode ``name``; an unknown name raises with the registered ones."""
    if name in BUILTIN_MODES:
        return BUILTIN_MODES[name]
    registry = _registry()
    if registry is None:
        raise UnknownNameError(f"unknown attention-loss mode {name!r}; valid: {', '.join(mode_names())}")
    mode = registry.create(name)  # raises with the registered names
    return ModeInfo(mode.name, mode.differentiable, mode.uses, mode.input_gradient)


def mode_names() -> list[str]:
    """Every registered mode."""
    registry = _registry()
    return registry.names() if registry is not None else sorted(BUILTIN_MODES)
