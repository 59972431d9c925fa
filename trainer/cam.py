"""Batched, differentiable Grad-CAM from the one forward pass of a training step.

``logits, cam = grad_cam(model, images, target)`` runs ``forward_features`` once, the head
once, and takes d(score)/d(features) with ``autograd.grad`` — through the head only, never a
second forward pass or a model copy. With ``create_graph=True`` (default when gradients are
enabled) the CAM is differentiable w.r.t. the model's parameters, so an attention loss on it
trains the backbone. Under ``torch.no_grad()`` (validation) the features carry no graph and
only the small head graph is built for the CAM.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import features_to_nchw

__all__ = ["cam_in_region", "grad_cam", "pointing_hits", "pointing_tolerance"]

_EPS = 1e-7


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor | Literal["predicted"] = "predicted",
    *,
    create_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, K)`` and Grad-CAM ``(B, 1, H, W)`` in [0, 1] for the whole batch in one pass.

    ``target``: a ``(B,)`` class tensor, or ``"predicted"`` for each image's arg-max class.
    CAM = ReLU(Σ_c mean_hw(∂score/∂A_c) · A_c) at the last feature map, bilinearly upsampled
    to the input size and min-max scaled per image.
    """
    outer_grad = torch.is_grad_enabled()
    if create_graph is None:
        create_graph = outer_grad
    feats = model.forward_features(images)  # (B, C, h, w) | (B, h, w, C) | (B, N, C)
    with torch.enable_grad():
        if not feats.requires_grad:  # validation under no_grad: graph through the head only
            feats = feats.detach().requires_grad_(True)
        logits = model.forward_head(feats)  # (B, K)
        if isinstance(target, str):
            if target != "predicted":
                raise ValueError(f"target must be a class tensor or 'predicted', got {target!r}")
            cls = logits.detach().argmax(1)
        else:
            cls = torch.as_tensor(target, device=logits.device).long().view(-1)
        score = logits.gather(1, cls[:, None]).sum()
        (grads,) = torch.autograd.grad(
            score, feats, create_graph=create_graph and outer_grad, retain_graph=True
        )
    with torch.set_grad_enabled(outer_grad):
        fmap = features_to_nchw(model, feats).float()  # (B, C, h, w)
        gmap = features_to_nchw(model, grads).float()  # (B, C, h, w)
        weights = gmap.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))  # (B, 1, h, w)
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        lo = cam.amin(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        hi = cam.amax(dim=(2, 3), keepdim=True)
        cam = (cam - lo) / (hi - lo + _EPS)  # (B, 1, H, W) in [0, 1]
        if not outer_grad:
            logits = logits.detach()
    return logits, cam


def cam_in_region(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of CAM mass inside ``mask`` per image ``(B,)``; 0 where the CAM is empty."""
    mass = cam.sum(dim=(1, 2, 3))  # (B,)
    inside = (cam * mask).sum(dim=(1, 2, 3))
    return inside / mass.clamp_min(_EPS)


def pointing_hits(cam: torch.Tensor, mask: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Pointing game per image ``(B,)`` bool: does the CAM's maximum fall inside ``mask``?

    ``tolerance`` pixels around the mask count as inside, as in the original pointing game
    (Zhang et al. 2016: 15 px at 224 px; :func:`pointing_tolerance` scales that to other sizes).
    """
    b = cam.shape[0]
    if tolerance > 0:
        mask = F.max_pool2d(mask.float(), kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)
    idx = cam.reshape(b, -1).argmax(dim=1)  # (B,)
    return mask.reshape(b, -1).gather(1, idx[:, None]).squeeze(1) > 0


def pointing_tolerance(size: int) -> int:
    """The pointing game's 15 px tolerance at 224 px, scaled to ``size``."""
    return round(15 * size / 224)
