"""The localization-aware attention loss and its modes.

For one image with region mask R and Grad-CAM M in [0, 1]:

* ``paper``:  1 − |{M > t} ∩ R| / |R| — a hard count, computed without gradient exactly as
  the authors' code does (the update is then just λ·∇CE).
* ``soft``:   1 − Σ σ((M − t)/τ)·R / |R| — the count made smooth; equals ``paper`` as τ → 0.
* ``energy``: 1 − Σ M·R / Σ M — one minus the share of CAM mass inside the region.

No Finding images (label 0) and images without a region count 0; the batch loss is the mean
over all rows. The full objective is ``λ·CE + (1 − λ)·L_att``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._registry import Registry

__all__ = ["LOSS_MODES", "attention_loss", "create_loss_mode"]

_EPS = 1e-7
PerImageLoss = Callable[..., torch.Tensor]
LOSS_MODES: Registry[PerImageLoss] = Registry("attention-loss mode")


def _area(region: torch.Tensor) -> torch.Tensor:
    return region.sum(dim=(1, 2, 3)).clamp_min(1.0)  # (B,)


@LOSS_MODES.register("paper")
def _paper(cam: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    with torch.no_grad():
        hits = ((cam > threshold).float() * region).sum(dim=(1, 2, 3))  # (B,)
        return 1.0 - hits / _area(region)


@LOSS_MODES.register("soft")
def _soft(cam: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    soft_hits = (torch.sigmoid((cam - threshold) / tau) * region).sum(dim=(1, 2, 3))  # (B,)
    return 1.0 - soft_hits / _area(region)


@LOSS_MODES.register("energy")
def _energy(cam: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    inside = (cam * region).sum(dim=(1, 2, 3))  # (B,)
    return 1.0 - inside / cam.sum(dim=(1, 2, 3)).clamp_min(_EPS)


def create_loss_mode(name: str) -> PerImageLoss:
    return LOSS_MODES.get(name)


def attention_loss(
    cam: torch.Tensor,
    region: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "paper",
    threshold: float = 0.5,
    tau: float = 0.05,
) -> torch.Tensor:
    """Batch mean of L_att; ``cam``/``region`` ``(B, 1, H, W)``, ``labels`` ``(B,)``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    per_image = LOSS_MODES.get(mode)(cam.float(), region.float(), threshold=threshold, tau=tau)  # (B,)
    counts = (labels != 0) & (region.sum(dim=(1, 2, 3)) > 0)  # (B,)
    return torch.where(counts, per_image, torch.zeros_like(per_image)).mean()
