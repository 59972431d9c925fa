"""The findings a phantom can carry: one random draw per image, rendered by :mod:`.render`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...tasks import CLASS_NAMES, NO_FINDING
from .anatomy import Anatomy, body_width, uniform

__all__ = ["Lesion", "sample_lesion"]


@dataclass(frozen=True)
class Lesion:
    """One finding; ``params`` are per affected lung side (0 = image left, 1 = image right)."""

    kind: str
    sides: tuple[int, ...]
    params: tuple[tuple[float, ...], ...]
    streaks: np.ndarray | None = None  # SE: (K, 5) x0, y0, x1, y1, half-width (anatomy coords)
    bubbles: np.ndarray | None = None  # SE: (B, 3) x, y, radius


def sample_lesion(rng: np.random.Generator, kind: str, a: Anatomy, boost: float = 0.0) -> Lesion | None:
    """Draw a finding of class ``kind`` for anatomy ``a``; ``boost`` in [0, 1] makes it larger."""
    if kind == NO_FINDING:
        return None
    both = rng.random()
    if kind == "Effusion":
        sides = (0, 1) if both < 0.25 else (int(rng.integers(0, 2)),)
        params = tuple(
            (
                uniform(rng, 0.7, 0.9) - 0.12 * boost,  # level (fraction of lung height, medial)
                uniform(rng, 0.1, 0.24),  # meniscus rise laterally (fraction of height)
                uniform(rng, 2.0, 3.5),  # meniscus exponent (concave up)
                uniform(rng, 0.55, 1.0),  # opacity (fraction of the lung's air replaced)
            )
            for _ in sides
        )
        return Lesion(kind, sides, params)
    if kind == "Pneumothorax":
        sides = (int(rng.integers(0, 2)),)
        params = (
            (
                uniform(rng, 0.36, 0.47),  # lowest extent (fraction of lung height)
                uniform(rng, 0.04, 0.12) + 0.05 * boost,  # apical cap height (fraction of lung height)
                uniform(rng, 0.2, 0.45) + 0.2 * boost,  # lateral gap (fraction of the lung's width)
                uniform(rng, 0.06, 0.14),  # extra lucency
                uniform(rng, 0.12, 0.24),  # pleural line density
            ),
        )
        return Lesion(kind, sides, params)
    if kind == "Subcutaneous Emphysema":
        sides = (0, 1) if both < 0.3 else (int(rng.integers(0, 2)),)
        streaks, bubbles, params = [], [], []
        for j in sides:
            s = -1.0 if j == 0 else 1.0
            d_lo = max(a.lung_dlat) + 0.015
            n_st = int(rng.integers(4, 12)) + int(4 * boost)
            n_bu = int(rng.integers(2, 10))
            for n_items, is_streak in ((n_st, True), (n_bu, False)):
                y = rng.uniform(0.15, 0.8, n_items)
                # where the chest wall lateral to the lungs is too thin (sloping shoulders), move down
                y = np.where(body_width(a, y) - d_lo > 0.027, y, rng.uniform(a.shoulder_y, 0.6, n_items))
                d_hi = body_width(a, y) - 0.015
                d = d_lo + (d_hi - d_lo) * rng.uniform(0.1, 0.9, n_items)
                x = 0.5 + s * d
                if is_streak:
                    ang = np.radians(rng.uniform(-40.0, 40.0, n_items))  # from vertical
                    half = 0.5 * rng.uniform(0.03, 0.09, n_items)
                    hw = rng.uniform(0.0045, 0.009, n_items) * (1.0 + boost)
                    dx, dy = np.sin(ang) * half, np.cos(ang) * half
                    streaks.append(np.stack([x - dx, y - dy, x + dx, y + dy, hw], axis=1))
                else:
                    r = rng.uniform(0.006, 0.014, n_items) * (1.0 + boost)
                    bubbles.append(np.stack([x, y, r], axis=1))
            params.append((uniform(rng, 0.25, 0.45),))  # air depth
        return Lesion(kind, sides, tuple(params), np.concatenate(streaks), np.concatenate(bubbles))
    raise ValueError(f"unknown class {kind!r}; valid: {list(CLASS_NAMES)}")
