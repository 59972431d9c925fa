"""Raster helpers of the phantom renderer: smooth ramps, a separable Gaussian blur, dilation,
distances to segments (plain numpy: deterministic, no BLAS)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["arc", "blur", "dilate", "gauss_taps", "seg_dist2", "smoothstep"]


def smoothstep(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def arc(x: np.ndarray) -> np.ndarray:
    """Quarter-circle ramp: 0 at x<=0, 1 at x>=1, vertical tangent at 0 (rounded apices)."""
    x = np.clip(x, 0.0, 1.0)
    return np.sqrt(1.0 - (1.0 - x) ** 2)


@lru_cache(maxsize=16)
def gauss_taps(size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian taps ``(2r+1,)`` and the edge normalization ``(size,)`` for :func:`blur`."""
    r = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    ones = np.pad(np.ones(size, dtype=np.float32), r)
    norm = sum(taps[i] * ones[i : i + size] for i in range(taps.size))
    return taps, (1.0 / norm).astype(np.float32)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, renormalized at the borders (plain numpy: no BLAS, deterministic)."""
    size = img.shape[0]
    taps, inv = gauss_taps(size, sigma)
    r = taps.size // 2
    p = np.pad(img, ((r, r), (0, 0)))
    out = sum(taps[i] * p[i : i + size] for i in range(taps.size)) * inv[:, None]
    p = np.pad(out, ((0, 0), (r, r)))
    return sum(taps[i] * p[:, i : i + size] for i in range(taps.size)) * inv[None, :]


def dilate(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    for _ in range(k):
        o = out.copy()
        o[1:, :] |= out[:-1, :]
        o[:-1, :] |= out[1:, :]
        o[:, 1:] |= out[:, :-1]
        o[:, :-1] |= out[:, 1:]
        out = o
    return out


def seg_dist2(px: np.ndarray, py: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Squared distance of points ``(P,)`` to segments ``(K, >=4)``: ``(K, P)``."""
    x0, y0, x1, y1 = (seg[:, i : i + 1] for i in range(4))
    vx, vy = x1 - x0, y1 - y0
    tt = np.clip(((px - x0) * vx + (py - y0) * vy) / np.maximum(vx * vx + vy * vy, 1e-12), 0.0, 1.0)
    return (px - x0 - tt * vx) ** 2 + (py - y0 - tt * vy) ** 2
