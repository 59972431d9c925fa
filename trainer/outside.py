"""What a decision reads outside the lungs: lung-only images, and the scores and augmentation built
on them.

A shortcut (a lead marker, a chest tube, a text label) usually lies outside the lungs, and every
prepared cache has lung masks. Replacing everything outside the (dilated) lung mask by a neutral
fill and asking the model again measures how much of its decision came from there, on any dataset,
without knowing what the shortcut is:

* ``outside_evidence``: the mean over images of P(true class | image) − P(true class | lung-only
  image). 0 for a model that reads only the lungs; large for one that reads the marker.
* ``outside_dependence``: the mean of |P(true class | image) − P(true class | lung-only image)|.
  The signed score cancels where a shortcut is independent of the label (a decorrelated test set:
  erasing the marker lowers P(true) on the findings that carry it and raises it on the No Finding
  images that carry it); this one does not.
* ``inside_only_accuracy`` and ``inside_only_f1_macro``: accuracy and macro F1 on the lung-only
  images (arg-max decisions).

The fills (``outside.fill``), per image, so that no fill carries a label: ``mean`` (the image's
mean), ``blur`` (a Gaussian blur of the image with σ = 1/8 of its side: it keeps coarse anatomy,
and so some of a compact marker's brightness — on the shortcut phantoms a marker reader's score is
0.11 with it against 0.45 with the others) or ``noise`` (Gaussian noise with the image's
mean and standard deviation; seeded, so an evaluation pass is repeatable).

The same replacement, at random during training, is the ``outside.augment`` baseline: it costs no
extra pass per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FILLS", "OutsideScores", "fill_outside", "lung_region", "outside_augment"]

FILLS = ("mean", "blur", "noise")


def lung_region(lung: torch.Tensor, dilate_px: int) -> torch.Tensor:
    """The lung mask ``(B, 1, H, W)`` dilated by ``dilate_px`` at 224 px (scaled to H), as {0, 1} float."""
    radius = round(dilate_px * lung.shape[-1] / 224)
    lung = (lung > 0).float()
    if radius <= 0:
        return lung
    return F.max_pool2d(lung, kernel_size=2 * radius + 1, stride=1, padding=radius)


def _blur(image: torch.Tensor) -> torch.Tensor:
    from kornia.filters import gaussian_blur2d

    sigma = max(image.shape[-1] / 8, 0.5)
    k = min(2 * round(2 * sigma) + 1, 2 * (image.shape[-1] // 2) - 1)  # odd, ±2σ, inside the image
    return gaussian_blur2d(image, (k, k), (sigma, sigma), border_type="reflect")


def fill_outside(
    image: torch.Tensor, keep: torch.Tensor, fill: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image`` ``(B, C, H, W)`` with every pixel where ``keep`` ``(B, 1, H, W)`` is 0 set to ``fill``."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    x = image.float()
    if fill == "blur":
        filler = _blur(x)
    else:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        if fill == "mean":
            filler = mean.expand_as(x)
        else:
            std = x.std(dim=(1, 2, 3), keepdim=True)
            noise = torch.randn(x.shape[0], 1, *x.shape[-2:], generator=generator, device=x.device)
            filler = (mean + std * noise).expand_as(x)  # grey noise, as the grey image replicated
    keep = keep.to(x.dtype)
    return (keep * x + (1.0 - keep) * filler).to(image.dtype)


def outside_augment(
    image: torch.Tensor, lung: torch.Tensor, p: float, fill: str, dilate_px: int
) -> torch.Tensor:
    """Training images with the outside of the lungs replaced by ``fill`` on a random share ``p`` of them."""
    if p <= 0:
        return image
    chosen = torch.rand(image.shape[0], device=image.device) < p  # (B,) from the seeded global stream
    if not bool(chosen.any()):
        return image
    keep = lung_region(lung, dilate_px)
    keep = torch.where(chosen[:, None, None, None], keep, torch.ones_like(keep))
    return fill_outside(image, keep, fill)


class OutsideScores:
    """``outside_evidence`` and the lung-only metrics, gathered over evaluation batches.

    ``update(p_full, p_inside, labels)``: class probabilities ``(B, K)`` of the images as they are
    and of their lung-only versions. ``compute()`` returns the four scores.
    """

    def __init__(self) -> None:
        self._drops: list[torch.Tensor] = []
        self._inside: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, p_full: torch.Tensor, p_inside: torch.Tensor, labels: torch.Tensor) -> None:
        rows = labels.long()[:, None]
        drop = p_full.float().gather(1, rows) - p_inside.float().gather(1, rows)  # (B, 1)
        self._drops.append(drop.squeeze(1).double())  # signed: the dependence is its magnitude
        self._inside.append(p_inside.float().argmax(1))
        self._labels.append(labels.long())

    def compute(self, num_classes: int) -> dict[str, Any]:
        if not self._labels:
            return {}
        from sklearn.metrics import accuracy_score, f1_score

        y = torch.cat(self._labels).cpu().numpy()
        pred = torch.cat(self._inside).cpu().numpy()
        return {
            "outside_evidence": float(torch.cat(self._drops).mean()),
            "outside_dependence": float(torch.cat(self._drops).abs().mean()),
            "inside_only_accuracy": float(accuracy_score(y, pred)),
            "inside_only_f1_macro": float(
                f1_score(y, pred, labels=list(range(num_classes)), average="macro", zero_division=0)
            ),
        }
