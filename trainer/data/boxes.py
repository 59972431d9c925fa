"""Lung bounding boxes from masks, batched."""

from __future__ import annotations

import torch

__all__ = ["boxes_from_masks"]


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Union bounding boxes ``(B, 4)`` as x, y, w, h (int64) of ``(B, [1,] H, W)`` masks.

    An empty mask gives the whole image as its box; the second output ``(B,)`` flags those
    fallbacks (a data-quality figure worth counting).
    """
    if masks.ndim == 4:
        masks = masks[:, 0]
    h, w = masks.shape[-2:]
    m = masks > 0  # (B, H, W)
    cols = m.any(dim=1)  # (B, W)
    rows = m.any(dim=2)  # (B, H)
    empty = ~cols.any(dim=1)  # (B,)
    xr = torch.arange(w, device=masks.device)
    yr = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, xr, w).amin(dim=1)
    x1 = torch.where(cols, xr, -1).amax(dim=1) + 1
    y0 = torch.where(rows, yr, h).amin(dim=1)
    y1 = torch.where(rows, yr, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)  # (B, 4)
    whole = torch.tensor([0, 0, w, h], device=masks.device)
    boxes = torch.where(empty[:, None], whole, boxes)
    return boxes.long(), empty
