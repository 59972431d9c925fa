"""Localization metrics: where the Grad-CAM points, against the prior region and (where ground
truth exists) the lesion mask. Functions of torch tensors; torch is imported where they run."""

from __future__ import annotations

from typing import Any

__all__ = ["LocalizationScores", "cam_in_region", "pointing_hits", "pointing_tolerance"]

_CAM_EPS = 1e-7  # an all-zero CAM has no mass: its share anywhere is 0


def cam_in_region(cam: Any, mask: Any) -> Any:
    """Share of CAM mass inside ``mask`` per image ``(B,)``; 0 where the CAM is empty."""
    mass = cam.sum(dim=(1, 2, 3))  # (B,)
    inside = (cam * mask).sum(dim=(1, 2, 3))
    return inside / mass.clamp_min(_CAM_EPS)


def pointing_hits(cam: Any, mask: Any, tolerance: int = 0) -> Any:
    """Pointing game per image ``(B,)`` bool: does the CAM's maximum fall inside ``mask``?

    ``tolerance`` pixels around the mask count as inside, as in the original pointing game
    (Zhang et al. 2016: 15 px at 224 px; :func:`pointing_tolerance` scales that to other sizes).
    """
    import torch.nn.functional as F

    b = cam.shape[0]
    if tolerance > 0:
        mask = F.max_pool2d(mask.float(), kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)
    idx = cam.reshape(b, -1).argmax(dim=1)  # (B,)
    return mask.reshape(b, -1).gather(1, idx[:, None]).squeeze(1) > 0


def pointing_tolerance(size: int) -> int:
    """The pointing game's 15 px tolerance at 224 px, scaled to ``size``."""
    return round(15 * size / 224)


class LocalizationScores:
    """Localization scores summed over evaluation batches, on the device (no host sync per batch).

    ``cam_in_prior``: CAM share inside the prior region, over pathology images that have one.
    Where lesion masks are ground truth (``update(..., lesion=, lesion_known=)``): the pointing
    game and the CAM share inside the lesion (:data:`LOCALIZATION_METRICS`), over pathology
    images with a non-empty lesion mask.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self._sums = torch.zeros(5, dtype=torch.float64, device=device)  # prior share, n, hits, share, n

    def update(
        self, cam: Any, region: Any, labels: Any, lesion: Any = None, lesion_known: Any = None
    ) -> None:
        """Add a batch: ``cam``, ``region``, ``lesion`` (B, 1, H, W); ``labels``, ``lesion_known`` (B,)."""
        import torch

        zero = torch.zeros((), dtype=torch.float64, device=cam.device)
        pos = (labels != 0) & (region.sum(dim=(1, 2, 3)) > 0)  # (B,)
        share = torch.where(pos, cam_in_region(cam, region).double(), zero).sum()
        self._sums[:2] += torch.stack([share, pos.sum().double()])
        if lesion is not None:
            known = lesion_known & (labels != 0) & (lesion.sum(dim=(1, 2, 3)) > 0)  # (B,)
            hits = pointing_hits(cam, lesion, pointing_tolerance(cam.shape[-1]))
            share = torch.where(known, cam_in_region(cam, lesion).double(), zero).sum()
            self._sums[2:] += torch.stack(
                [torch.where(known, hits.double(), zero).sum(), share, known.sum().double()]
            )

    def compute(self) -> dict[str, float]:
        prior_share, prior_n, hits, lesion_share, lesion_n = self._sums.tolist()
        out = {"cam_in_prior": prior_share / prior_n if prior_n else 0.0}
        if lesion_n:
            out["pointing_game"] = hits / lesion_n
            out["cam_in_region"] = lesion_share / lesion_n
        return out
