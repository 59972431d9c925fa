"""Region priors: where a lesion may appear, as data relative to the lung bounding box.

A prior is a box in lung-box units (0..1 spans the union lung box; values beyond it reach
outside, and are clipped to the image) plus whether the region is the columns *inside* that
box or the columns *outside* it, within its rows. The paper's priors are:

* Effusion: lower half of the lung box.
* Pneumothorax: upper half of the lung box.
* Subcutaneous emphysema: everything outside the lung box's columns, from the box top down
  to the image bottom.

`cxr-sweep prior` derives such a prior from one annotated X-ray; trials read it from YAML.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._registry import Registry

__all__ = [
    "DEFAULT_PRIORS",
    "PRIORS",
    "RegionPrior",
    "create_prior",
    "load_priors",
    "prior_from_boxes",
    "prior_from_image",
    "prior_table",
    "region_masks",
    "save_prior",
]


class RegionPrior(BaseModel):
    """A lesion region relative to the lung box: rows ``y``, columns ``x``, inside or outside them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: tuple[float, float] = Field((0.0, 1.0), description="Column band [x0, x1] in lung-box widths.")
    y: tuple[float, float] = Field((0.0, 1.0), description="Row band [y0, y1] in lung-box heights (inf ok).")
    columns: Literal["inside", "outside"] = Field(
        "inside", description="Region = the x band (inside) or every column but the x band (outside)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> RegionPrior:
        for name, (lo, hi) in (("x", self.x), ("y", self.y)):
            if math.isnan(lo) or math.isnan(hi) or not lo < hi:
                raise ValueError(f"{name} band must satisfy {name}0 < {name}1, got [{lo}, {hi}]")
        return self


PRIORS: Registry[RegionPrior] = Registry("region prior")


@PRIORS.register("lower_lung")
def _lower_lung() -> RegionPrior:
    return RegionPrior(x=(0.0, 1.0), y=(0.5, 1.0), columns="inside")


@PRIORS.register("upper_lung")
def _upper_lung() -> RegionPrior:
    return RegionPrior(x=(0.0, 1.0), y=(0.0, 0.5), columns="inside")


@PRIORS.register("outside_lung_columns")
def _outside_lung_columns() -> RegionPrior:
    return RegionPrior(x=(0.0, 1.0), y=(0.0, math.inf), columns="outside")


@PRIORS.register("whole_lung")
def _whole_lung() -> RegionPrior:
    return RegionPrior(x=(0.0, 1.0), y=(0.0, 1.0), columns="inside")


def create_prior(name: str) -> RegionPrior:
    return PRIORS.create(name)


DEFAULT_PRIORS: dict[str, RegionPrior] = {
    "Effusion": create_prior("lower_lung"),
    "Pneumothorax": create_prior("upper_lung"),
    "Subcutaneous Emphysema": create_prior("outside_lung_columns"),
}


def prior_from_boxes(
    lung_box: Sequence[float],
    lesion_box: Sequence[float],
    columns: Literal["auto", "inside", "outside"] = "auto",
    both_sides: bool = True,
) -> RegionPrior:
    """The prior of one annotated X-ray: its lesion box (x, y, w, h) in units of its lung box.

    ``columns="auto"`` picks ``outside`` when the lesion lies wholly beside the lung box's columns
    (subcutaneous emphysema), else ``inside``. ``both_sides`` mirrors the column band about the
    lung box's centre line and takes the union: a finding seen on one side of one patient may be
    on either side of the next.
    """
    lx, ly, lw, lh = (float(v) for v in lung_box)
    x, y, w, h = (float(v) for v in lesion_box)
    if lw <= 0 or lh <= 0 or w <= 0 or h <= 0:
        raise ValueError(
            f"boxes need positive width and height: lung {tuple(lung_box)}, lesion {tuple(lesion_box)}"
        )
    x0, x1 = (x - lx) / lw, (x + w - lx) / lw
    y0, y1 = (y - ly) / lh, (y + h - ly) / lh
    if columns == "auto":
        columns = "outside" if x1 <= 0.0 or x0 >= 1.0 else "inside"
    if columns == "outside":  # the band of lung columns to exclude, in these rows
        return RegionPrior(x=(0.0, 1.0), y=(round(y0, 4), round(y1, 4)), columns="outside")
    if both_sides:
        x0, x1 = min(x0, 1.0 - x1), max(x1, 1.0 - x0)
    return RegionPrior(x=(round(x0, 4), round(x1, 4)), y=(round(y0, 4), round(y1, 4)), columns="inside")


def prior_from_image(
    image: Any,
    lesion_box: Sequence[float],
    lung_mask: Any,
    columns: Literal["auto", "inside", "outside"] = "auto",
    both_sides: bool = True,
) -> tuple[RegionPrior, list[int]]:
    """The prior of one annotated X-ray (``(H, W)`` arrays: the image and its lung mask): the lesion
    box (x, y, w, h in its pixels) relative to the union box of the lung mask, as in
    :func:`prior_from_boxes`. Returns the prior and that lung box; bad input raises ``ValueError``."""
    from .data.boxes import boxes_from_masks

    h, w = image.shape
    if lung_mask.shape != image.shape:
        raise ValueError(f"lung mask size {lung_mask.shape[::-1]} differs from the image's {(w, h)}")
    box, empty = boxes_from_masks(torch.as_tensor(lung_mask)[None])
    if bool(empty[0]):
        raise ValueError("no lung found, so the lesion cannot be expressed relative to a lung box")
    x, y, bw, bh = lesion_box
    if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w or y + bh > h:
        raise ValueError(f"lesion box {tuple(lesion_box)} is not inside the {w}x{h} image")
    lung = box[0].tolist()
    return prior_from_boxes(lung, lesion_box, columns=columns, both_sides=both_sides), lung


def load_priors(path: str | Path) -> dict[str, RegionPrior]:
    """Priors from YAML (``cxr-sweep prior``): ``{priors: {Class: {x, y, columns}}}`` or ``{Class: ...}``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"priors file {path}: not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"priors file {path}: not valid YAML: {e}") from None
    if isinstance(data, dict) and "priors" in data:
        data = data["priors"]
    if not isinstance(data, dict):
        raise ValueError(f"priors file {path}: expected a mapping of class name to prior")
    out = {}
    for name, raw in data.items():
        raw = {k: v for k, v in (raw or {}).items() if k != "source"} if isinstance(raw, dict) else raw
        try:
            out[str(name)] = RegionPrior.model_validate(raw)
        except ValidationError as e:
            why = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
            raise ValueError(f"priors file {path}: prior {name!r}: {why}") from None
    return out


def save_prior(path: str | Path, label: str, prior: RegionPrior, source: dict[str, Any]) -> Path:
    """Add (or replace) ``label``'s prior in the priors YAML at ``path``, atomically."""
    import yaml

    path = Path(path)
    existing: dict[str, Any] = {}
    if path.exists():
        load_priors(path)  # refuse to merge into a file that is not a priors file
        existing = (yaml.safe_load(path.read_text()) or {}).get("priors", {})
    existing[label] = {"x": list(prior.x), "y": list(prior.y), "columns": prior.columns, "source": source}
    text = (
        "# Region priors relative to the union lung box (written by `cxr-sweep prior`).\n"
        "# Use in a trial config:  attention: {priors: <this file>}\n"
        + yaml.safe_dump({"priors": existing}, sort_keys=False, default_flow_style=None)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def prior_table(classes: Sequence[str], priors: Mapping[str, RegionPrior]) -> torch.Tensor:
    """Per-class prior parameters ``(C, 6)``: x0, x1, y0, y1, outside flag, has-region flag.

    Class 0 (No Finding) and classes without a prior get has-region 0, so their region is empty.
    """
    rows = []
    for i, name in enumerate(classes):
        p = priors.get(name) if i > 0 else None
        if p is None:
            rows.append([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
        else:
            y1 = min(p.y[1], 1e6)  # inf → "to the image edge" after clipping
            rows.append([p.x[0], p.x[1], p.y[0], y1, float(p.columns == "outside"), 1.0])
    return torch.tensor(rows, dtype=torch.float32)


def region_masks(boxes: torch.Tensor, labels: torch.Tensor, table: torch.Tensor, size: tuple[int, int]):
    """Batched region masks ``(B, 1, H, W)`` in {0, 1} for each image's labelled class.

    ``boxes`` (B, 4) lung boxes x, y, w, h in pixels at ``size``; ``labels`` (B,) class ids;
    ``table`` from :func:`prior_table`. No Finding rows (and classes without a prior) are all zero.
    """
    h, w = size
    p = table.to(boxes.device)[labels]  # (B, 6)
    bx, by, bw, bh = boxes.float().unbind(1)  # (B,) each
    x0 = bx + p[:, 0] * bw
    x1 = bx + p[:, 1] * bw
    y0 = by + p[:, 2] * bh
    y1 = by + p[:, 3] * bh
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5  # pixel centres (W,)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5  # (H,)
    in_cols = (xs[None] >= x0[:, None]) & (xs[None] < x1[:, None])  # (B, W)
    in_rows = (ys[None] >= y0[:, None]) & (ys[None] < y1[:, None])  # (B, H)
    outside = p[:, 4].bool()[:, None]  # (B, 1)
    cols = in_cols ^ outside  # (B, W)
    region = in_rows[:, :, None] & cols[:, None, :]  # (B, H, W)
    region &= p[:, 5].bool()[:, None, None]
    return region[:, None].float()  # (B, 1, H, W)
