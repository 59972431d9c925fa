"""Synthetic frontal (PA) chest X-ray phantoms with exact lung and lesion masks.

Real chest radiographs cannot be downloaded here, so the demo, the tests and the benchmarks run on
these phantoms instead. Each image is drawn from a per-patient anatomy (body outline, shoulders,
two lung fields with branching vessel markings, mediastinum and heart shadow, diaphragm domes,
posterior and anterior ribs, clavicles, spine, trachea) seen through a simple attenuation model:
densities are summed, blurred, turned into transmitted photon counts with Poisson noise and shown
as ``1 - transmission`` (dense = bright, air = dark). Several images of one patient share the
anatomy and differ in exposure, noise, a small shift / rotation and (independently) the finding.

Findings, each with an exact binary lesion mask (the pixels whose density the finding changed):

* ``Effusion``: fluid filling the lower part of one or both lung fields, meniscus rising
  laterally, costophrenic angle blunted.
* ``Pneumothorax``: apical / lateral air gap between a collapsed lung and the chest wall, without
  lung markings, bounded by a thin bright visceral pleural line.
* ``Subcutaneous Emphysema``: dark air streaks and bubbles in the lateral chest-wall and shoulder
  soft tissue, outside the columns spanned by the lung fields.
* ``No Finding``: normal, empty lesion mask.

An optional "shortcut" marker (a bright radiographer's letter block in the upper-left corner, over
the background) can be drawn with a label correlation set separately for train+val and test.

Everything is vectorized per image with numpy (no scipy, no torch); matplotlib is imported only by
:func:`montage`. ``python -m trainer.data.phantom --montage docs/phantoms.png`` draws the figure.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .splits import split_counts

__all__ = ["CLASS_NAMES", "MARKER_BOX", "PhantomSet", "generate", "montage", "synthesize"]

CLASS_NAMES: tuple[str, ...] = ("No Finding", "Effusion", "Pneumothorax", "Subcutaneous Emphysema")
SPLITS: tuple[str, str, str] = ("train", "val", "test")
SHORTCUT_KEYS: tuple[str, str] = ("trainval", "test")
CSV_COLUMNS: tuple[str, ...] = (
    "image_id",
    "patient_id",
    "label",
    "split",
    "path",
    "lung_mask_path",
    "lesion_mask_path",
    "marker",
)

# Marker block (image coordinates, fraction of the side): fixed, over the background.
MARKER_BOX = (0.045, 0.045, 0.125, 0.125)  # x0, y0, x1, y1
_MAX_LESION_TRIES = 8


@dataclass
class PhantomSet:
    """In-memory phantom data set; all per-image sequences have length ``N``.

    Attributes:
        image_ids: ``"ph000123"``-style image ids.
        patient_ids: ``"p00042"``-style patient ids (several images may share one).
        labels: class name of each image (one of :data:`CLASS_NAMES`).
        splits: ``"train"``, ``"val"`` or ``"test"``; patient-disjoint.
        markers: ``(N,)`` bool, whether the spurious marker was drawn.
        images: ``(N, S, S)`` uint8 grayscale radiographs.
        lung_masks: ``(N, S, S)`` uint8 in {0, 1}, union of both lung fields.
        lesion_masks: ``(N, S, S)`` uint8 in {0, 1}; all zero for ``"No Finding"``.
        classes: the class list the set was drawn with (index 0 is ``"No Finding"``).
    """

    image_ids: list[str]
    patient_ids: list[str]
    labels: list[str]
    splits: list[str]
    markers: np.ndarray
    images: np.ndarray
    lung_masks: np.ndarray
    lesion_masks: np.ndarray
    classes: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def label_indices(self) -> np.ndarray:
        """``(N,)`` int64 index of each label in :attr:`classes`."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[lab] for lab in self.labels], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient anatomy in canonical coordinates (x right, y down, both in [0, 1])."""

    zoom: float
    rot: float  # radians
    shift_x: float
    shift_y: float
    # body outline and soft tissue
    neck_w: float
    shoulder_w: float
    waist_w: float
    shoulder_y: float
    tissue0: float
    tissue1: float
    abd_density: float
    # lungs, index 0 = image left (patient right), 1 = image right (patient left)
    lung_top: tuple[float, float]
    lung_cp: tuple[float, float]
    lung_dapex: tuple[float, float]
    lung_dlat: tuple[float, float]
    lung_tw: tuple[float, float]
    dome_h: tuple[float, float]
    dome_c: tuple[float, float]
    air: tuple[float, float]
    med_w0: float
    med_w1: float
    # heart and great vessels
    heart_cx: float
    heart_cy: float
    heart_a: float
    heart_b: float
    heart_ang: float
    heart_density: float
    knob_dx: float
    knob_y: float
    knob_r: float
    # bones
    rib_y0: float
    rib_sp: float
    rib_c: float
    rib_k: float
    rib_dp: float
    rib_thick: float
    rib_density: float
    n_ribs: int
    clav_y: float
    clav_density: float
    spine_w: float
    spine_y0: float
    spine_sp: float
    spine_density: float
    # airways, stomach
    trachea_w: float
    carina_y: float
    gastric: bool
    gastric_dx: float
    # lung markings: vessel segments (M, 5) = x0, y0, x1, y1, relative width
    vessels: np.ndarray
    hila: np.ndarray  # (2, 2) x, y
    vessel_density: float
    hilum_density: float


@dataclass(frozen=True)
class _View:
    """Per-image acquisition: small pose change, exposure, contrast and noise."""

    rot: float
    zoom: float
    shift_x: float
    shift_y: float
    k: float  # attenuation scale
    n0: float  # photons per pixel (noise level)
    lo: float
    hi: float
    gamma: float
    e_noise: float
    noise_seed: int


@dataclass(frozen=True)
class _Lesion:
    """One finding; ``params`` are per affected lung side (0 = image left, 1 = image right)."""

    kind: str
    sides: tuple[int, ...]
    params: tuple[tuple[float, ...], ...]
    streaks: np.ndarray | None = None  # SE: (K, 5) x0, y0, x1, y1, half-width (anatomy coords)
    bubbles: np.ndarray | None = None  # SE: (B, 3) x, y, radius


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one patient's anatomy."""
    med_w0 = _u(rng, 0.058, 0.072)
    med_w1 = _u(rng, 0.0, 0.015)
    dlat = _u(rng, 0.33, 0.38)
    top = _u(rng, 0.12, 0.17)
    cp = _u(rng, 0.78, 0.85)
    lung_top = (top + _u(rng, -0.008, 0.008), top + _u(rng, -0.005, 0.012))
    lung_cp = (cp - _u(rng, 0.0, 0.035), cp)  # right hemidiaphragm (image left) higher
    lung_dlat = (dlat + _u(rng, -0.012, 0.012), dlat + _u(rng, -0.012, 0.012))
    hila = np.array(
        [
            [0.5 - med_w0 - _u(rng, 0.03, 0.045), _u(rng, 0.41, 0.45)],
            [0.5 + med_w0 + _u(rng, 0.035, 0.05), _u(rng, 0.38, 0.42)],
        ]
    )
    vessels = np.concatenate(
        [_vessel_tree(rng, hila[j, 0], hila[j, 1], -1.0 if j == 0 else 1.0) for j in range(2)]
    )
    return _Anatomy(
        zoom=_u(rng, 0.9, 1.02),
        rot=math.radians(_u(rng, -3.0, 3.0)),
        shift_x=_u(rng, -0.025, 0.025),
        shift_y=_u(rng, -0.02, 0.025),
        neck_w=_u(rng, 0.075, 0.095),
        shoulder_w=_u(rng, 0.47, 0.5),
        waist_w=_u(rng, 0.42, 0.46),
        shoulder_y=_u(rng, 0.2, 0.27),
        tissue0=_u(rng, 0.3, 0.4),
        tissue1=_u(rng, 0.5, 0.62),
        abd_density=_u(rng, 0.12, 0.22),
        lung_top=lung_top,
        lung_cp=lung_cp,
        lung_dapex=(_u(rng, 0.15, 0.19), _u(rng, 0.15, 0.19)),
        lung_dlat=lung_dlat,
        lung_tw=(_u(rng, 0.6, 0.8), _u(rng, 0.6, 0.8)),
        dome_h=(_u(rng, 0.05, 0.09), _u(rng, 0.045, 0.085)),
        dome_c=(_u(rng, 0.4, 0.55), _u(rng, 0.4, 0.55)),
        air=(_u(rng, 0.66, 0.8), _u(rng, 0.66, 0.8)),
        med_w0=med_w0,
        med_w1=med_w1,
        heart_cx=0.5 + _u(rng, 0.065, 0.09),
        heart_cy=_u(rng, 0.66, 0.7),
        heart_a=_u(rng, 0.17, 0.2),
        heart_b=_u(rng, 0.11, 0.13),
        heart_ang=math.radians(_u(rng, 35.0, 48.0)),
        heart_density=_u(rng, 0.06, 0.12),
        knob_dx=_u(rng, 0.045, 0.065),
        knob_y=_u(rng, 0.27, 0.31),
        knob_r=_u(rng, 0.025, 0.035),
        rib_y0=_u(rng, 0.1, 0.13),
        rib_sp=_u(rng, 0.052, 0.064),
        rib_c=_u(rng, 0.0, 0.04),
        rib_k=_u(rng, 2.0, 2.8),
        rib_dp=_u(rng, 0.11, 0.15),
        rib_thick=_u(rng, 0.32, 0.4),
        rib_density=_u(rng, 0.1, 0.16),
        n_ribs=12,
        clav_y=_u(rng, 0.17, 0.21),
        clav_density=_u(rng, 0.24, 0.34),
        spine_w=_u(rng, 0.03, 0.038),
        spine_y0=_u(rng, 0.0, 0.05),
        spine_sp=_u(rng, 0.055, 0.065),
        spine_density=_u(rng, 0.06, 0.1),
        trachea_w=_u(rng, 0.014, 0.02),
        carina_y=_u(rng, 0.3, 0.35),
        gastric=bool(rng.random() < 0.6),
        gastric_dx=_u(rng, 0.14, 0.22),
        vessels=vessels,
        hila=hila,
        vessel_density=_u(rng, 0.14, 0.22),
        hilum_density=_u(rng, 0.06, 0.1),
    )


def _vessel_tree(
    rng: np.random.Generator, hx: float, hy: float, s: float, generations: int = 7
) -> np.ndarray:
    """Branching vessel segments ``(M, 5)`` (x0, y0, x1, y1, width) from a hilum at (hx, hy).

    Monopodial branching: each segment continues almost straight (slightly thinner) and sends
    off one thinner side branch. Angles are in a lateral frame: 0 points laterally (direction
    ``s`` in x), -90 degrees up, +90 degrees down.
    """
    trunk = np.array([-100.0, -60.0, -20.0, 20.0, 55.0, 90.0])
    ang = np.radians(trunk + rng.uniform(-12.0, 12.0, trunk.size))
    length = rng.uniform(0.035, 0.05, trunk.size) * np.where(trunk > 0, 1.15, 1.0)
    x = np.full(trunk.size, hx) + s * 0.01 * np.cos(ang)
    y = np.full(trunk.size, hy) + 0.01 * np.sin(ang)
    width = np.ones(trunk.size)
    out = []
    for _ in range(generations):
        ex = x + s * np.cos(ang) * length
        ey = y + np.sin(ang) * length
        out.append(np.stack([x, y, ex, ey, width], axis=1))
        n = ang.size
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        main = ang + np.radians(rng.uniform(-10.0, 10.0, n)) - side * np.radians(rng.uniform(0.0, 8.0, n))
        branch = ang + side * np.radians(rng.uniform(25.0, 60.0, n))
        ang = np.concatenate([main, branch])
        x = np.concatenate([ex, ex])
        y = np.concatenate([ey, ey])
        length = np.concatenate([length * rng.uniform(0.8, 0.95, n), length * rng.uniform(0.55, 0.8, n)])
        width = np.concatenate([width * 0.85, width * 0.6])
    return np.concatenate(out)


def _sample_view(rng: np.random.Generator) -> _View:
    """Draw one image's pose jitter, exposure and noise."""
    return _View(
        rot=math.radians(_u(rng, -1.0, 1.0)),
        zoom=_u(rng, 0.98, 1.02),
        shift_x=_u(rng, -0.012, 0.012),
        shift_y=_u(rng, -0.012, 0.012),
        k=_u(rng, 1.35, 1.75),
        n0=float(np.exp(rng.uniform(np.log(2000.0), np.log(8000.0)))),  # photons/pixel at 128 px
        lo=_u(rng, 0.0, 0.04),
        hi=_u(rng, 0.93, 1.0),
        gamma=_u(rng, 0.95, 1.35),
        e_noise=_u(rng, 0.002, 0.008),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


def _body_width(a: _Anatomy, y: np.ndarray | float) -> np.ndarray:
    """Half-width of the body outline at height ``y`` (canonical coordinates)."""
    s1 = _smoothstep(np.asarray(y) / a.shoulder_y)
    w = a.neck_w + (a.shoulder_w - a.neck_w) * s1
    return w + (a.waist_w - a.shoulder_w) * _smoothstep((np.asarray(y) - 0.35) / 0.35)


def _sample_lesion(rng: np.random.Generator, kind: str, a: _Anatomy, boost: float = 0.0) -> _Lesion | None:
    """Draw a finding of class ``kind`` for anatomy ``a``; ``boost`` in [0, 1] makes it larger."""
    if kind == "No Finding":
        return None
    both = rng.random()
    if kind == "Effusion":
        sides = (0, 1) if both < 0.25 else (int(rng.integers(0, 2)),)
        params = tuple(
            (
                _u(rng, 0.7, 0.9) - 0.12 * boost,  # level (fraction of lung height, medial)
                _u(rng, 0.1, 0.24),  # meniscus rise laterally (fraction of height)
                _u(rng, 2.0, 3.5),  # meniscus exponent (concave up)
                _u(rng, 0.55, 1.0),  # opacity (fraction of the lung's air replaced)
            )
            for _ in sides
        )
        return _Lesion(kind, sides, params)
    if kind == "Pneumothorax":
        sides = (int(rng.integers(0, 2)),)
        params = (
            (
                _u(rng, 0.36, 0.47),  # lowest extent (fraction of lung height)
                _u(rng, 0.04, 0.12) + 0.05 * boost,  # apical cap height (fraction of lung height)
                _u(rng, 0.2, 0.45) + 0.2 * boost,  # lateral gap (fraction of the lung's width)
                _u(rng, 0.06, 0.14),  # extra lucency
                _u(rng, 0.12, 0.24),  # pleural line density
            ),
        )
        return _Lesion(kind, sides, params)
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
                y = np.where(_body_width(a, y) - d_lo > 0.027, y, rng.uniform(a.shoulder_y, 0.6, n_items))
                d_hi = _body_width(a, y) - 0.015
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
            params.append((_u(rng, 0.25, 0.45),))  # air depth
        return _Lesion(kind, sides, tuple(params), np.concatenate(streaks), np.concatenate(bubbles))
    raise ValueError(f"unknown class {kind!r}; valid: {list(CLASS_NAMES)}")


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _arc(x: np.ndarray) -> np.ndarray:
    """Quarter-circle ramp: 0 at x<=0, 1 at x>=1, vertical tangent at 0 (rounded apices)."""
    x = np.clip(x, 0.0, 1.0)
    return np.sqrt(1.0 - (1.0 - x) ** 2)


@lru_cache(maxsize=16)
def _gauss_taps(size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian taps ``(2r+1,)`` and the edge normalization ``(size,)`` for :func:`_blur`."""
    r = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    ones = np.pad(np.ones(size, dtype=np.float32), r)
    norm = sum(taps[i] * ones[i : i + size] for i in range(taps.size))
    return taps, (1.0 / norm).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, renormalized at the borders (plain numpy: no BLAS, deterministic)."""
    size = img.shape[0]
    taps, inv = _gauss_taps(size, sigma)
    r = taps.size // 2
    p = np.pad(img, ((r, r), (0, 0)))
    out = sum(taps[i] * p[i : i + size] for i in range(taps.size)) * inv[:, None]
    p = np.pad(out, ((0, 0), (r, r)))
    return sum(taps[i] * p[:, i : i + size] for i in range(taps.size)) * inv[None, :]


def _dilate(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    for _ in range(k):
        o = out.copy()
        o[1:, :] |= out[:-1, :]
        o[:-1, :] |= out[1:, :]
        o[:, 1:] |= out[:, :-1]
        o[:, :-1] |= out[:, 1:]
        out = o
    return out


def _lung_field(
    ax: np.ndarray, ay: np.ndarray, a: _Anatomy, j: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lung field ``j`` outline (before the heart / aortic knob are cut out).

    Returns ``inside, d, t, med, lat, ybot``: the field, the distance from the midline, the
    fractional height, the medial and lateral border distances and the diaphragm height.
    """
    s = -1.0 if j == 0 else 1.0
    d = s * (ax - 0.5)
    top, cp = a.lung_top[j], a.lung_cp[j]
    t = (ay - top) / (cp - top)
    mw = a.med_w0 + a.med_w1 * np.clip((ay - 0.25) / 0.45, 0.0, 1.0)
    dap, dlat = a.lung_dapex[j], a.lung_dlat[j]
    lat = dap + (dlat * (0.93 + 0.07 * np.clip(t, 0.0, 1.0)) - dap) * _arc(t / a.lung_tw[j])
    med = dap - (dap - mw) * _arc(t / 0.22)
    dm = a.med_w0 + a.med_w1
    dc = dm + (dlat - dm) * a.dome_c[j]
    dd = np.clip(d, dm, dlat) - dc
    u2 = np.where(dd < 0, 0.6 * (dd / (dc - dm)) ** 2, (dd / (dlat - dc)) ** 2)
    ybot = cp - a.dome_h[j] * (1.0 - u2)
    inside = (t >= 0.0) & (d >= med) & (d <= lat) & (ay <= ybot)
    return inside, d, t, med, lat, ybot


def _seg_dist2(px: np.ndarray, py: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Squared distance of points ``(P,)`` to segments ``(K, >=4)``: ``(K, P)``."""
    x0, y0, x1, y1 = (seg[:, i : i + 1] for i in range(4))
    vx, vy = x1 - x0, y1 - y0
    tt = np.clip(((px - x0) * vx + (py - y0) * vy) / np.maximum(vx * vx + vy * vy, 1e-12), 0.0, 1.0)
    return (px - x0 - tt * vx) ** 2 + (py - y0 - tt * vy) ** 2


def _rib_field(u: np.ndarray, a: _Anatomy, slope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rib index and normalized distance to the nearest rib centre for rib-aligned height ``u``."""
    p = (u - a.rib_y0) / a.rib_sp
    c = max(a.rib_c, 1e-6)  # rib i sits at y0 + sp * (i + c * i**2): lower ribs are wider apart
    idx = (np.sqrt(np.maximum(1.0 + 4.0 * c * p, 0.0)) - 1.0) / (2.0 * c)
    n = np.round(idx)
    local_sp = a.rib_sp * (1.0 + 2.0 * a.rib_c * np.maximum(n, 0.0))
    r = np.abs(idx - n) * local_sp / np.sqrt(1.0 + slope * slope) / (0.5 * a.rib_thick * local_sp)
    return n, r


def _render(
    a: _Anatomy, v: _View, lesion: _Lesion | None, marker: bool, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image; returns ``(image uint8, lung mask uint8, lesion mask uint8)``."""
    f32 = np.float32
    S = size
    c = (np.arange(S, dtype=f32) + 0.5) / S
    th = a.rot + v.rot
    z = a.zoom * v.zoom
    sx, sy = a.shift_x + v.shift_x, a.shift_y + v.shift_y
    ct, st = math.cos(th), math.sin(th)
    X = (c - 0.5 - sx)[None, :]
    Y = (c - 0.5 - sy)[:, None]
    ax = (0.5 + (ct * X + st * Y) / z).astype(f32)  # canonical coordinates of each pixel
    ay = (0.5 + (-st * X + ct * Y) / z).astype(f32)

    # body and soft tissue
    dx = ax - 0.5
    adx = np.abs(dx)
    w = _body_width(a, ay)
    chord = np.sqrt(np.clip(1.0 - (adx / w) ** 2, 0.0, 1.0))
    body = np.clip((w - adx) / 0.006, 0.0, 1.0)
    D = body * (a.tissue0 + a.tissue1 * chord)

    # heart, aortic knob, lungs
    hx, hy = ax - a.heart_cx, ay - a.heart_cy
    ca, sa = math.cos(a.heart_ang), math.sin(a.heart_ang)
    ia, ib = 1.0 / a.heart_a**2, 1.0 / a.heart_b**2
    qa, qb, qc = ca * ca * ia + sa * sa * ib, 2.0 * ca * sa * (ia - ib), sa * sa * ia + ca * ca * ib
    disc = (qb * hx) ** 2 - 4.0 * qc * (qa * hx * hx - 1.0)
    y_upper = (-qb * hx - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * qc)
    heart = (disc >= 0.0) & (hy >= y_upper)  # the ellipse and everything below it
    knob = (ax - 0.5 - a.knob_dx) ** 2 + (ay - a.knob_y) ** 2 <= a.knob_r**2
    lungs, info = [], []
    for j in range(2):
        inside, d, t, med, lat, ybot = _lung_field(ax, ay, a, j)
        lung = inside & ~heart & ~knob
        lungs.append(lung)
        info.append((d, t, med, lat, ybot))
    lung_any = lungs[0] | lungs[1]
    ydia = np.where(ax < 0.5, info[0][4], info[1][4])
    abdomen = (ay > ydia) & (body > 0)
    abd = abdomen * _smoothstep((ay - ydia) / 0.03 + 0.3)
    D += a.abd_density * abd
    D += a.heart_density * (heart & ~abdomen) + 0.5 * a.heart_density * knob

    # lesions that modify the lungs
    lesion_mask = np.zeros((S, S), dtype=bool)
    fluid = np.zeros((S, S), dtype=f32)
    no_marks = np.zeros((S, S), dtype=bool)  # lung without markings (pneumothorax)
    line = np.zeros((S, S), dtype=bool)
    extra_air = np.zeros((S, S), dtype=f32)
    collapsed_dense = np.zeros((S, S), dtype=bool)
    if lesion is not None and lesion.kind == "Effusion":
        for j, (level, rise, expo, alpha) in zip(lesion.sides, lesion.params, strict=True):
            d, t, med, lat, _ = info[j]
            pos = np.clip((d - med) / np.maximum(lat - med, 1e-6), 0.0, 1.0)
            tmen = np.maximum(level - rise * pos**expo, 0.56)
            m = lungs[j] & (t > tmen)
            lesion_mask |= m
            fluid += m * alpha * (0.85 + 0.15 * np.clip((t - tmen) / 0.1, 0.0, 1.0))
    elif lesion is not None and lesion.kind == "Pneumothorax":
        j = lesion.sides[0]
        tcut, tap, glat, lucency, line_density = lesion.params[0]
        d, t, med, lat, _ = info[j]
        pos = np.clip((d - med) / np.maximum(lat - med, 1e-6), 0.0, 1.0)
        r = np.clip((tcut - t) / (tcut - tap), 0.0, 1.0)
        gap = glat * r**0.7 + (1.0 - glat) * r**4  # lateral fraction of the row that is air
        m = lungs[j] & (t < tcut) & (pos > 1.0 - gap)
        lesion_mask |= m
        no_marks |= m
        extra_air += lucency * m
        line = _dilate(m, max(1, round(S / 128))) & lungs[j] & ~m
        collapsed_dense = lungs[j] & (t < tcut) & ~m & ~line

    # lung air (less at the borders, apices and bases), with fluid replacing part of it
    for j in range(2):
        d, t, med, lat, _ = info[j]
        pos = np.clip((d - med) / np.maximum(lat - med, 1e-6), 0.0, 1.0)
        depth = np.sqrt(np.maximum(np.sin(np.pi * pos), 0.0))
        prof = (0.5 + 0.5 * depth) * (0.8 + 0.2 * np.clip(t / 0.25, 0.0, 1.0))
        prof *= 1.0 - 0.15 * np.clip((t - 0.75) / 0.25, 0.0, 1.0)
        D -= lungs[j] * a.air[j] * prof * (1.0 - np.clip(fluid, 0.0, 1.0))
    D -= extra_air
    D += 0.12 * fluid
    D += 0.04 * collapsed_dense

    # lung markings: branching vessels splatted bilinearly, plus hilar shadows
    vs = a.vessels
    seg_len = np.hypot(vs[:, 2] - vs[:, 0], vs[:, 3] - vs[:, 1])
    n_pts = np.maximum(2, np.ceil(seg_len * S * z * 2.0)).astype(np.int64)
    seg = np.repeat(np.arange(len(vs)), n_pts)
    start = np.cumsum(n_pts) - n_pts
    tt = (np.arange(seg.size) - start[seg] + 0.5) / n_pts[seg]
    qx = vs[seg, 0] + tt * (vs[seg, 2] - vs[seg, 0])
    qy = vs[seg, 1] + tt * (vs[seg, 3] - vs[seg, 1])
    wts = (seg_len[seg] / n_pts[seg]) * S * z * (0.009 * vs[seg, 4]) * S * z
    vmap = _splat(qx, qy, wts, a, v, S)
    for hxy in a.hila:
        vmap += (
            2.5
            * a.hilum_density
            / a.vessel_density
            * np.exp(-((ax - hxy[0]) ** 2 + (ay - hxy[1]) ** 2) / (2 * 0.022**2))
        )
    marks = lung_any & ~no_marks
    D += a.vessel_density * vmap * marks * (1.0 - 0.9 * np.clip(fluid, 0.0, 1.0))
    D += line_density * line if lesion is not None and lesion.kind == "Pneumothorax" else 0.0

    # bones: posterior and anterior ribs, clavicles, humeral heads, spine
    ad = adx
    inbody = (body > 0) * (1.0 - 0.7 * abd)  # bones are faint below the diaphragm
    f_post = a.rib_k * ((ad - a.rib_dp) ** 2 - (0.03 - a.rib_dp) ** 2)
    slope = 2.0 * a.rib_k * (ad - a.rib_dp)
    n, r = _rib_field(ay - f_post, a, slope)
    ok = (n >= 0) & (n < a.n_ribs) & (r < 1.0)
    cage = np.minimum(np.where(ax < 0.5, info[0][3], info[1][3]) + 0.035, w)  # rib cage half-width
    fade = _smoothstep((ad - 0.02) / 0.04) * _smoothstep((cage - ad) / 0.025)
    D += a.rib_density * ok * (0.75 + 0.25 * r * r) * fade * inbody
    d_l = 0.4
    f_join = a.rib_k * ((d_l - a.rib_dp) ** 2 - (0.03 - a.rib_dp) ** 2)
    e = np.maximum(d_l - ad, 0.0)
    f_ant = f_join + 0.45 * e + 0.8 * e * e
    n, r = _rib_field(ay - f_ant, a, -(0.45 + 1.6 * e))
    r = r / 0.75
    ok = (n >= 0) & (n < 7) & (r < 1.0) & (ad < d_l)
    fade = _smoothstep((ad - 0.12) / 0.06) * _smoothstep((cage - ad) / 0.025)
    D += 0.35 * a.rib_density * ok * fade * inbody
    e = ad - 0.035
    yc = a.clav_y - 0.3 * e + 0.4 * e * e
    half = 0.011 + 0.004 * np.clip(1.0 - e / 0.27, 0.0, 1.0)
    rc = np.abs(ay - yc) * np.cos(np.arctan(-0.3 + 0.8 * e)) / half
    fade = _smoothstep(e / 0.02) * _smoothstep((0.3 - e) / 0.03)
    D += a.clav_density * (rc < 1.0) * (0.8 + 0.2 * rc * rc) * fade
    hum = (ad - 0.5) ** 2 + (ay - a.shoulder_y - 0.01) ** 2 <= 0.075**2
    D += 0.12 * hum * inbody
    q = (ay - a.spine_y0) / a.spine_sp
    vert = np.where(q - np.floor(q) < 0.78, 1.0, 0.45)
    D += a.spine_density * (ad < a.spine_w) * vert * _smoothstep(ay / 0.1)

    # airways and stomach gas
    D -= 0.12 * ((ad < a.trachea_w) & (ay < a.carina_y))
    bron = np.array(
        [
            [0.5, a.carina_y - 0.01, 0.5 - 0.07, a.carina_y + 0.05, 0.0],
            [0.5, a.carina_y - 0.01, 0.5 + 0.08, a.carina_y + 0.06, 0.0],
        ]
    )
    near = (ay > a.carina_y - 0.03) & (ay < a.carina_y + 0.08) & (ad < 0.1)
    idx = np.flatnonzero(near)
    if idx.size:
        d2 = _seg_dist2(ax.ravel()[idx], ay.ravel()[idx], bron).min(axis=0)
        D.ravel()[idx] -= 0.08 * (d2 < (0.8 * a.trachea_w) ** 2)
    if a.gastric:
        gx = 0.5 + a.gastric_dx
        gy = a.lung_cp[1] - a.dome_h[1] * 0.5 + 0.055
        gas = (((ax - gx) / 0.045) ** 2 + ((ay - gy) / 0.03) ** 2 <= 1.0) & (ay > gy - 0.012)
        D -= 0.15 * gas

    # subcutaneous emphysema: air streaks lateral to the lung columns, inside the chest wall
    if lesion is not None and lesion.kind == "Subcutaneous Emphysema":
        cols = np.flatnonzero(lung_any.any(axis=0))
        outside = np.ones(S, dtype=bool)
        if cols.size:
            outside[cols[0] : cols[-1] + 1] = False
        cand = outside[None, :] & ((w - adx) > 0.008) & ~lung_any & (ay > 0.08) & (ay < 0.9)
        idx = np.flatnonzero(cand)
        if idx.size:
            px, py = ax.ravel()[idx], ay.ravel()[idx]
            hit = (_seg_dist2(px, py, lesion.streaks) < lesion.streaks[:, 4:5] ** 2).any(axis=0)
            b = lesion.bubbles
            hit |= ((px - b[:, 0:1]) ** 2 + (py - b[:, 1:2]) ** 2 < b[:, 2:3] ** 2).any(axis=0)
            depth = float(np.mean([p[0] for p in lesion.params]))
            lesion_mask.ravel()[idx[hit]] = True
            D.ravel()[idx[hit]] -= depth

    # marker: lead letter block at a fixed image position
    if marker:
        x0, y0, x1, y1 = MARKER_BOX
        cx, cy = c[None, :], c[:, None]
        wbar = 0.38 * (x1 - x0)
        box = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        letter = box & ((cx <= x0 + wbar) | (cy >= y1 - wbar))
        D += 2.5 * letter + 0.9 * (box & ~letter)

    # acquisition: blur, attenuation, Poisson photon noise, electronic noise, window / gamma
    np.maximum(D, 0.0, out=D)
    D = _blur(D.astype(np.float32), max(0.45, 0.0045 * S))
    rng = np.random.default_rng(v.noise_seed)
    trans = np.exp(-v.k * D.astype(np.float64))
    n0 = v.n0 * (128.0 / S) ** 2  # same photons per unit area at any size
    counts = rng.poisson(n0 * trans)
    img = 1.0 - counts / n0 + rng.normal(0.0, v.e_noise, (S, S))
    img = np.clip((img - v.lo) / (v.hi - v.lo), 0.0, 1.0) ** v.gamma
    img8 = np.round(img * 255.0).astype(np.uint8)
    return img8, lung_any.astype(np.uint8), lesion_mask.astype(np.uint8)


def _splat(qx: np.ndarray, qy: np.ndarray, wts: np.ndarray, a: _Anatomy, v: _View, S: int) -> np.ndarray:
    """Bilinear splat of canonical-coordinate points into an ``(S, S)`` image."""
    th = a.rot + v.rot
    z = a.zoom * v.zoom
    ct, st = math.cos(th), math.sin(th)
    px = 0.5 + a.shift_x + v.shift_x + z * (ct * (qx - 0.5) - st * (qy - 0.5))
    py = 0.5 + a.shift_y + v.shift_y + z * (st * (qx - 0.5) + ct * (qy - 0.5))
    fx, fy = px * S - 0.5, py * S - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    rx, ry = fx - x0, fy - y0
    out = np.zeros(S * S, dtype=np.float64)
    for ox, oy, wgt in (
        (0, 0, (1 - rx) * (1 - ry)),
        (1, 0, rx * (1 - ry)),
        (0, 1, (1 - rx) * ry),
        (1, 1, rx * ry),
    ):
        xi, yi = x0 + ox, y0 + oy
        ok = (xi >= 0) & (xi < S) & (yi >= 0) & (yi < S)
        out += np.bincount(yi[ok] * S + xi[ok], weights=(wts * wgt)[ok], minlength=S * S)
    return out.reshape(S, S).astype(np.float32)


def _draw(
    a: _Anatomy, rng: np.random.Generator, label: str, marker: bool, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw an image of ``label`` for anatomy ``a``, redrawing a finding whose mask came out empty."""
    view = _sample_view(rng)
    for attempt in range(_MAX_LESION_TRIES):
        lesion = _sample_lesion(rng, label, a, boost=min(1.0, attempt / 3))
        out = _render(a, view, lesion, marker, size)
        if lesion is None or out[2].any():
            return out
    raise RuntimeError(f"could not draw a visible {label!r} lesion at size {size}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ValueError(
            f"classes must be a sequence of class names from {list(CLASS_NAMES)}, got {classes!r}"
        )
    out = tuple(classes)
    for name in out:
        if name not in CLASS_NAMES:
            raise ValueError(f"unknown class {name!r}; valid class names: {list(CLASS_NAMES)}")
    if len(out) < 2:
        raise ValueError(f"need at least 2 classes ('No Finding' + a finding), got {list(out)}")
    if out[0] != "No Finding":
        raise ValueError(f"the first class must be 'No Finding' (the negative class), got {out[0]!r}")
    if len(set(out)) != len(out):
        dup = next(c for c in out if out.count(c) > 1)
        raise ValueError(f"duplicate class {dup!r} in {list(out)}")
    return out


def _check_shortcut(shortcut: Mapping[str, float] | None) -> dict[str, float] | None:
    if shortcut is None:
        return None
    if not isinstance(shortcut, Mapping):
        raise ValueError(f"shortcut must be None or a mapping with keys {list(SHORTCUT_KEYS)}")
    for key in shortcut:
        if key not in SHORTCUT_KEYS:
            raise ValueError(f"unknown shortcut key {key!r}; valid keys: {list(SHORTCUT_KEYS)}")
    out = {}
    for key in SHORTCUT_KEYS:
        if key not in shortcut:
            raise ValueError(f"shortcut is missing key {key!r} (needs {list(SHORTCUT_KEYS)})")
        try:
            c = float(shortcut[key])
        except (TypeError, ValueError):
            raise ValueError(
                f"shortcut[{key!r}] must be a number in [-1, 1], got {shortcut[key]!r}"
            ) from None
        if not -1.0 <= c <= 1.0:  # also rejects NaN
            raise ValueError(f"shortcut[{key!r}] = {c} is outside [-1, 1]")
        out[key] = c
    return out


def synthesize(
    n_patients: int,
    classes: Sequence[str],
    size: int = 128,
    seed: int = 0,
    shortcut: Mapping[str, float] | None = None,
    *,
    images_per_patient: tuple[int, int] = (1, 3),
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> PhantomSet:
    """Draw a phantom data set in memory.

    Args:
        n_patients: number of patients; each gets ``images_per_patient`` images (inclusive range)
            sharing one anatomy.
        classes: class names from :data:`CLASS_NAMES`, ``"No Finding"`` first, at least two.
        size: image side in pixels (>= 32).
        seed: everything (anatomy, labels, splits, markers, noise) follows from it.
        shortcut: ``None`` for no markers, or ``{"trainval": c1, "test": c2}`` with correlation
            strengths in [-1, 1]: within each split, a fraction ``(1 + c) / 2`` of the pathology
            images and ``(1 - c) / 2`` of the ``No Finding`` images carry the marker (rounded
            counts, marked images chosen at random).
        images_per_patient: ``(min, max)`` images per patient, both inclusive.
        split_fractions: train / val / test fractions of the *patients* (patient-disjoint).

    Labels are balanced (counts differ by at most one, in the whole set and within each split)
    and assigned by a seeded permutation, independently of the patient.

    Raises:
        ValueError: on unknown / misplaced class names, bad shortcut keys or strengths, or
            out-of-range sizes, counts and fractions; the message names the offending value.
    """
    classes = _check_classes(classes)
    sc = _check_shortcut(shortcut)
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer) or n_patients < 1:
        raise ValueError(f"n_patients must be a positive integer, got {n_patients!r}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    try:
        lo, hi = (int(x) for x in images_per_patient)
    except (TypeError, ValueError):
        raise ValueError(f"images_per_patient must be (min, max), got {images_per_patient!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(
            f"images_per_patient must be (min, max) with 1 <= min <= max, got {images_per_patient!r}"
        )
    try:
        fr = tuple(float(f) for f in split_fractions)
    except (TypeError, ValueError):
        raise ValueError(f"split_fractions must be 3 numbers, got {split_fractions!r}") from None
    if len(fr) != 3 or any(not f >= 0.0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions!r}"
        )
    n_patients, size = int(n_patients), int(size)

    ss_struct, ss_pat, ss_img = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(ss_struct)
    per_patient = rng.integers(lo, hi + 1, size=n_patients)
    counts = split_counts(n_patients, fr)
    psplit = np.empty(n_patients, dtype=np.int64)
    perm = rng.permutation(n_patients)
    psplit[perm[: counts[0]]] = 0
    psplit[perm[counts[0] : counts[0] + counts[1]]] = 1
    psplit[perm[counts[0] + counts[1] :]] = 2
    img_patient = np.repeat(np.arange(n_patients), per_patient)
    img_split = psplit[img_patient]
    n_img = img_patient.size

    # balanced labels: cyclic over images ordered split by split (shuffled within each split)
    k = len(classes)
    order = np.concatenate([rng.permutation(np.flatnonzero(img_split == s)) for s in range(3)])
    lab = np.empty(n_img, dtype=np.int64)
    lab[order] = (int(rng.integers(k)) + np.arange(n_img)) % k

    markers = np.zeros(n_img, dtype=bool)
    if sc is not None:
        for s in range(3):
            c = sc["test"] if s == 2 else sc["trainval"]
            for positive, p in ((True, (1.0 + c) / 2.0), (False, (1.0 - c) / 2.0)):
                idx = np.flatnonzero((img_split == s) & ((lab > 0) == positive))
                m = math.floor(p * idx.size + 0.5)
                markers[rng.permutation(idx)[:m]] = True

    images = np.empty((n_img, size, size), dtype=np.uint8)
    lung_masks = np.empty_like(images)
    lesion_masks = np.empty_like(images)
    pat_seeds = ss_pat.spawn(n_patients)
    img_seeds = ss_img.spawn(n_img)
    i = 0
    for p in range(n_patients):
        anat = _sample_anatomy(np.random.default_rng(pat_seeds[p]))
        for _ in range(int(per_patient[p])):
            r = np.random.default_rng(img_seeds[i])
            images[i], lung_masks[i], lesion_masks[i] = _draw(
                anat, r, classes[lab[i]], bool(markers[i]), size
            )
            i += 1

    return PhantomSet(
        image_ids=[f"ph{i:06d}" for i in range(n_img)],
        patient_ids=[f"p{p:05d}" for p in img_patient],
        labels=[classes[x] for x in lab],
        splits=[SPLITS[s] for s in img_split],
        markers=markers,
        images=images,
        lung_masks=lung_masks,
        lesion_masks=lesion_masks,
        classes=classes,
    )


def generate(
    out_dir: str | os.PathLike[str],
    n_patients: int,
    classes: Sequence[str],
    size: int = 128,
    seed: int = 0,
    shortcut: Mapping[str, float] | None = None,
    **kwargs,
) -> pathlib.Path:
    """Synthesize a data set (see :func:`synthesize`; ``kwargs`` go there) and write it to disk.

    Layout: ``images/<id>.png`` (uint8 grayscale), ``lung_masks/<id>.png`` and
    ``lesion_masks/<id>.png`` (0 / 255) and ``labels.csv`` with columns :data:`CSV_COLUMNS`
    (paths relative to ``out_dir``, ``marker`` 0 / 1). An existing ``labels.csv`` is removed first
    and the new one is written last (temp file + ``os.replace``), so an interrupted run never
    leaves a ``labels.csv`` pointing at missing or partial files.

    Returns:
        The path of ``labels.csv``.
    """
    from PIL import Image

    ds = synthesize(n_patients, classes, size, seed, shortcut, **kwargs)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "labels.csv"
    csv_path.unlink(missing_ok=True)
    for sub in ("images", "lung_masks", "lesion_masks"):
        (out / sub).mkdir(exist_ok=True)
    rows = []
    for i, iid in enumerate(ds.image_ids):
        rel = (f"images/{iid}.png", f"lung_masks/{iid}.png", f"lesion_masks/{iid}.png")
        Image.fromarray(ds.images[i]).save(out / rel[0])
        Image.fromarray(ds.lung_masks[i] * np.uint8(255)).save(out / rel[1])
        Image.fromarray(ds.lesion_masks[i] * np.uint8(255)).save(out / rel[2])
        rows.append((iid, ds.patient_ids[i], ds.labels[i], ds.splits[i], *rel, int(ds.markers[i])))
    fd, tmp = tempfile.mkstemp(prefix=".labels.", suffix=".csv.tmp", dir=out)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, csv_path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return csv_path


def _example(
    label: str, seed: int, size: int, marker: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image of ``label`` from patient ``seed`` (used by the montage and the tests)."""
    ss_pat, ss_img = np.random.SeedSequence([seed, 7]).spawn(2)
    anat = _sample_anatomy(np.random.default_rng(ss_pat))
    return _draw(anat, np.random.default_rng(ss_img), label, marker, size)


def montage(
    out_png: str | os.PathLike[str], size: int = 256, seed: int = 0, per_class: int = 3
) -> pathlib.Path:
    """Save a figure of example phantoms: one row per class plus one row with the marker.

    Lung masks are outlined in cyan, lesion masks in red. Returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(name, name, False) for name in CLASS_NAMES]
    rows.append(("marker (shortcut)", None, True))
    fig = Figure(figsize=(2.3 * per_class, 2.45 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), per_class, squeeze=False)
    for r, (title, label, marker) in enumerate(rows):
        for col in range(per_class):
            lab = label if label is not None else CLASS_NAMES[col % len(CLASS_NAMES)]
            img, lung, les = _example(lab, seed * 1000 + r * 100 + col, size, marker)
            ax = axes[r, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.contour(lung, levels=[0.5], colors="cyan", linewidths=0.7)
            if les.any():
                ax.contour(les, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(title if label is not None else f"{title}: {lab}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _cli(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.phantom", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--montage", metavar="PNG", help="write an example montage to this PNG")
    parser.add_argument("--generate", metavar="DIR", help="write a data set (images, masks, labels.csv) here")
    parser.add_argument("--n-patients", type=int, default=100)
    parser.add_argument("--classes", nargs="+", default=list(CLASS_NAMES))
    parser.add_argument("--size", type=int, default=None, help="image side (default 256 montage, 128 data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.montage and not args.generate:
        parser.error("nothing to do: give --montage PNG and/or --generate DIR")
    if args.montage:
        print(montage(args.montage, size=args.size or 256, seed=args.seed, per_class=args.per_class))
    if args.generate:
        print(generate(args.generate, args.n_patients, args.classes, size=args.size or 128, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
