"""Drawing one phantom: anatomy, lung fields, findings, bones, marker, then the acquisition
(blur, attenuation, Poisson photon noise, window and gamma)."""

from __future__ import annotations

import math

import numpy as np

from .anatomy import Anatomy, View, body_width, sample_view
from .lesions import Lesion, sample_lesion
from .raster import arc, blur, dilate, seg_dist2, smoothstep

__all__ = ["MARKER_BOX", "draw", "render"]

# Marker block (image coordinates, fraction of the side): fixed, over the background.
MARKER_BOX = (0.045, 0.045, 0.125, 0.125)  # x0, y0, x1, y1
_MAX_LESION_TRIES = 8


def lung_field(
    ax: np.ndarray, ay: np.ndarray, a: Anatomy, j: int
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
    lat = dap + (dlat * (0.93 + 0.07 * np.clip(t, 0.0, 1.0)) - dap) * arc(t / a.lung_tw[j])
    med = dap - (dap - mw) * arc(t / 0.22)
    dm = a.med_w0 + a.med_w1
    dc = dm + (dlat - dm) * a.dome_c[j]
    dd = np.clip(d, dm, dlat) - dc
    u2 = np.where(dd < 0, 0.6 * (dd / (dc - dm)) ** 2, (dd / (dlat - dc)) ** 2)
    ybot = cp - a.dome_h[j] * (1.0 - u2)
    inside = (t >= 0.0) & (d >= med) & (d <= lat) & (ay <= ybot)
    return inside, d, t, med, lat, ybot


def rib_field(u: np.ndarray, a: Anatomy, slope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rib index and normalized distance to the nearest rib centre for rib-aligned height ``u``."""
    p = (u - a.rib_y0) / a.rib_sp
    c = max(a.rib_c, 1e-6)  # rib i sits at y0 + sp * (i + c * i**2): lower ribs are wider apart
    idx = (np.sqrt(np.maximum(1.0 + 4.0 * c * p, 0.0)) - 1.0) / (2.0 * c)
    n = np.round(idx)
    local_sp = a.rib_sp * (1.0 + 2.0 * a.rib_c * np.maximum(n, 0.0))
    r = np.abs(idx - n) * local_sp / np.sqrt(1.0 + slope * slope) / (0.5 * a.rib_thick * local_sp)
    return n, r


def render(
    a: Anatomy, v: View, lesion: Lesion | None, marker: bool, size: int
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
    w = body_width(a, ay)
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
        inside, d, t, med, lat, ybot = lung_field(ax, ay, a, j)
        lung = inside & ~heart & ~knob
        lungs.append(lung)
        info.append((d, t, med, lat, ybot))
    lung_any = lungs[0] | lungs[1]
    ydia = np.where(ax < 0.5, info[0][4], info[1][4])
    abdomen = (ay > ydia) & (body > 0)
    abd = abdomen * smoothstep((ay - ydia) / 0.03 + 0.3)
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
        line = dilate(m, max(1, round(S / 128))) & lungs[j] & ~m
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
    vmap = splat(qx, qy, wts, a, v, S)
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
    n, r = rib_field(ay - f_post, a, slope)
    ok = (n >= 0) & (n < a.n_ribs) & (r < 1.0)
    cage = np.minimum(np.where(ax < 0.5, info[0][3], info[1][3]) + 0.035, w)  # rib cage half-width
    fade = smoothstep((ad - 0.02) / 0.04) * smoothstep((cage - ad) / 0.025)
    D += a.rib_density * ok * (0.75 + 0.25 * r * r) * fade * inbody
    d_l = 0.4
    f_join = a.rib_k * ((d_l - a.rib_dp) ** 2 - (0.03 - a.rib_dp) ** 2)
    e = np.maximum(d_l - ad, 0.0)
    f_ant = f_join + 0.45 * e + 0.8 * e * e
    n, r = rib_field(ay - f_ant, a, -(0.45 + 1.6 * e))
    r = r / 0.75
    ok = (n >= 0) & (n < 7) & (r < 1.0) & (ad < d_l)
    fade = smoothstep((ad - 0.12) / 0.06) * smoothstep((cage - ad) / 0.025)
    D += 0.35 * a.rib_density * ok * fade * inbody
    e = ad - 0.035
    yc = a.clav_y - 0.3 * e + 0.4 * e * e
    half = 0.011 + 0.004 * np.clip(1.0 - e / 0.27, 0.0, 1.0)
    rc = np.abs(ay - yc) * np.cos(np.arctan(-0.3 + 0.8 * e)) / half
    fade = smoothstep(e / 0.02) * smoothstep((0.3 - e) / 0.03)
    D += a.clav_density * (rc < 1.0) * (0.8 + 0.2 * rc * rc) * fade
    hum = (ad - 0.5) ** 2 + (ay - a.shoulder_y - 0.01) ** 2 <= 0.075**2
    D += 0.12 * hum * inbody
    q = (ay - a.spine_y0) / a.spine_sp
    vert = np.where(q - np.floor(q) < 0.78, 1.0, 0.45)
    D += a.spine_density * (ad < a.spine_w) * vert * smoothstep(ay / 0.1)

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
        d2 = seg_dist2(ax.ravel()[idx], ay.ravel()[idx], bron).min(axis=0)
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
            hit = (seg_dist2(px, py, lesion.streaks) < lesion.streaks[:, 4:5] ** 2).any(axis=0)
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
    D = blur(D.astype(np.float32), max(0.45, 0.0045 * S))
    rng = np.random.default_rng(v.noise_seed)
    trans = np.exp(-v.k * D.astype(np.float64))
    n0 = v.n0 * (128.0 / S) ** 2  # same photons per unit area at any size
    counts = rng.poisson(n0 * trans)
    img = 1.0 - counts / n0 + rng.normal(0.0, v.e_noise, (S, S))
    img = np.clip((img - v.lo) / (v.hi - v.lo), 0.0, 1.0) ** v.gamma
    img8 = np.round(img * 255.0).astype(np.uint8)
    return img8, lung_any.astype(np.uint8), lesion_mask.astype(np.uint8)


def draw(
    a: Anatomy, rng: np.random.Generator, label: str, marker: bool, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw an image of ``label`` for anatomy ``a``, redrawing a finding whose mask came out empty."""
    view = sample_view(rng)
    for attempt in range(_MAX_LESION_TRIES):
        lesion = sample_lesion(rng, label, a, boost=min(1.0, attempt / 3))
        out = render(a, view, lesion, marker, size)
        if lesion is None or out[2].any():
            return out
    raise RuntimeError(f"could not draw a visible {label!r} lesion at size {size}")  # pragma: no cover


def splat(qx: np.ndarray, qy: np.ndarray, wts: np.ndarray, a: Anatomy, v: View, S: int) -> np.ndarray:
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
