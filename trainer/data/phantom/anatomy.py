"""Per-patient anatomy and per-image acquisition of a phantom: the random draws, in canonical
coordinates (x right, y down, both in [0, 1])."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .raster import smoothstep

__all__ = ["Anatomy", "View", "body_width", "sample_anatomy", "sample_view", "uniform"]


@dataclass(frozen=True)
class Anatomy:
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
class View:
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


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy."""
    med_w0 = uniform(rng, 0.058, 0.072)
    med_w1 = uniform(rng, 0.0, 0.015)
    dlat = uniform(rng, 0.33, 0.38)
    top = uniform(rng, 0.12, 0.17)
    cp = uniform(rng, 0.78, 0.85)
    lung_top = (top + uniform(rng, -0.008, 0.008), top + uniform(rng, -0.005, 0.012))
    lung_cp = (cp - uniform(rng, 0.0, 0.035), cp)  # right hemidiaphragm (image left) higher
    lung_dlat = (dlat + uniform(rng, -0.012, 0.012), dlat + uniform(rng, -0.012, 0.012))
    hila = np.array(
        [
            [0.5 - med_w0 - uniform(rng, 0.03, 0.045), uniform(rng, 0.41, 0.45)],
            [0.5 + med_w0 + uniform(rng, 0.035, 0.05), uniform(rng, 0.38, 0.42)],
        ]
    )
    vessels = np.concatenate(
        [vessel_tree(rng, hila[j, 0], hila[j, 1], -1.0 if j == 0 else 1.0) for j in range(2)]
    )
    return Anatomy(
        zoom=uniform(rng, 0.9, 1.02),
        rot=math.radians(uniform(rng, -3.0, 3.0)),
        shift_x=uniform(rng, -0.025, 0.025),
        shift_y=uniform(rng, -0.02, 0.025),
        neck_w=uniform(rng, 0.075, 0.095),
        shoulder_w=uniform(rng, 0.47, 0.5),
        waist_w=uniform(rng, 0.42, 0.46),
        shoulder_y=uniform(rng, 0.2, 0.27),
        tissue0=uniform(rng, 0.3, 0.4),
        tissue1=uniform(rng, 0.5, 0.62),
        abd_density=uniform(rng, 0.12, 0.22),
        lung_top=lung_top,
        lung_cp=lung_cp,
        lung_dapex=(uniform(rng, 0.15, 0.19), uniform(rng, 0.15, 0.19)),
        lung_dlat=lung_dlat,
        lung_tw=(uniform(rng, 0.6, 0.8), uniform(rng, 0.6, 0.8)),
        dome_h=(uniform(rng, 0.05, 0.09), uniform(rng, 0.045, 0.085)),
        dome_c=(uniform(rng, 0.4, 0.55), uniform(rng, 0.4, 0.55)),
        air=(uniform(rng, 0.66, 0.8), uniform(rng, 0.66, 0.8)),
        med_w0=med_w0,
        med_w1=med_w1,
        heart_cx=0.5 + uniform(rng, 0.065, 0.09),
        heart_cy=uniform(rng, 0.66, 0.7),
        heart_a=uniform(rng, 0.17, 0.2),
        heart_b=uniform(rng, 0.11, 0.13),
        heart_ang=math.radians(uniform(rng, 35.0, 48.0)),
        heart_density=uniform(rng, 0.06, 0.12),
        knob_dx=uniform(rng, 0.045, 0.065),
        knob_y=uniform(rng, 0.27, 0.31),
        knob_r=uniform(rng, 0.025, 0.035),
        rib_y0=uniform(rng, 0.1, 0.13),
        rib_sp=uniform(rng, 0.052, 0.064),
        rib_c=uniform(rng, 0.0, 0.04),
        rib_k=uniform(rng, 2.0, 2.8),
        rib_dp=uniform(rng, 0.11, 0.15),
        rib_thick=uniform(rng, 0.32, 0.4),
        rib_density=uniform(rng, 0.1, 0.16),
        n_ribs=12,
        clav_y=uniform(rng, 0.17, 0.21),
        clav_density=uniform(rng, 0.24, 0.34),
        spine_w=uniform(rng, 0.03, 0.038),
        spine_y0=uniform(rng, 0.0, 0.05),
        spine_sp=uniform(rng, 0.055, 0.065),
        spine_density=uniform(rng, 0.06, 0.1),
        trachea_w=uniform(rng, 0.014, 0.02),
        carina_y=uniform(rng, 0.3, 0.35),
        gastric=bool(rng.random() < 0.6),
        gastric_dx=uniform(rng, 0.14, 0.22),
        vessels=vessels,
        hila=hila,
        vessel_density=uniform(rng, 0.14, 0.22),
        hilum_density=uniform(rng, 0.06, 0.1),
    )


def vessel_tree(rng: np.random.Generator, hx: float, hy: float, s: float, generations: int = 7) -> np.ndarray:
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


def sample_view(rng: np.random.Generator) -> View:
    """Draw one image's pose jitter, exposure and noise."""
    return View(
        rot=math.radians(uniform(rng, -1.0, 1.0)),
        zoom=uniform(rng, 0.98, 1.02),
        shift_x=uniform(rng, -0.012, 0.012),
        shift_y=uniform(rng, -0.012, 0.012),
        k=uniform(rng, 1.35, 1.75),
        n0=float(np.exp(rng.uniform(np.log(2000.0), np.log(8000.0)))),  # photons/pixel at 128 px
        lo=uniform(rng, 0.0, 0.04),
        hi=uniform(rng, 0.93, 1.0),
        gamma=uniform(rng, 0.95, 1.35),
        e_noise=uniform(rng, 0.002, 0.008),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


def body_width(a: Anatomy, y: np.ndarray | float) -> np.ndarray:
    """Half-width of the body outline at height ``y`` (canonical coordinates)."""
    s1 = smoothstep(np.asarray(y) / a.shoulder_y)
    w = a.neck_w + (a.shoulder_w - a.neck_w) * s1
    return w + (a.waist_w - a.shoulder_w) * smoothstep((np.asarray(y) - 0.35) / 0.35)
