"""Region priors: where a lesion may appear, as data relative to the lung bounding box.

A prior is a union of boxes in lung-box units (0..1 spans the union lung box; values beyond it,
±inf included, reach outside it and are clipped to the image), or the complement of that union:
everything in the image but those boxes. The paper's priors are:

* Effusion: lower half of the lung box (``lower_lung``).
* Pneumothorax: upper half of the lung box (``upper_lung``).
* Subcutaneous emphysema: the whole image except the lung box's columns from the box top down,
  so the full-width rows above the box belong to it (``outside_lung_columns_or_above``: the
  authors' script zeroes ``[box_y:224, box_x:box_x+box_w]`` and keeps the rest).

`cxr-sweep prior` derives a prior from one annotated X-ray; trials read priors by registry name,
inline, or from a priors YAML.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._registry import Registry

if TYPE_CHECKING:  # PyTorch loads where tensors are made: a config check needs none
    import torch

__all__ = [
    "DEFAULT_PRIORS",
    "PRIORS",
    "Box",
    "RegionPrior",
    "create_prior",
    "load_priors",
    "prior_from_boxes",
    "prior_from_image",
    "prior_table",
    "region_masks",
    "save_prior",
]

_INF = math.inf


class Box(BaseModel):
    """Rows ``y`` × columns ``x`` in lung-box heights / widths (±inf: to the image edge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: tuple[float, float] = Field((0.0, 1.0), description="Column band [x0, x1] in lung-box widths.")
    y: tuple[float, float] = Field((0.0, 1.0), description="Row band [y0, y1] in lung-box heights.")

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        for name, (lo, hi) in (("x", self.x), ("y", self.y)):
            if math.isnan(lo) or math.isnan(hi) or not lo < hi:
                raise ValueError(f"{name} band must satisfy {name}0 < {name}1, got [{lo}, {hi}]")
        return self


class RegionPrior(BaseModel):
    """A lesion region relative to the lung box: the union of ``boxes``, or (``complement``) the
    image outside that union.

    The older form ``{x, y, columns}`` still loads: ``inside`` is one box, ``outside`` the columns
    left and right of the x band within the y band (two boxes).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    boxes: tuple[Box, ...] = Field((Box(),), min_length=1, description="The region: a union of boxes.")
    complement: bool = Field(False, description="Region = the image outside the boxes instead.")

    @model_validator(mode="before")
    @classmethod
    def _rows_and_columns(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not {"x", "y", "columns"} & set(data):
            return data
        if "boxes" in data:
            raise ValueError("give boxes (and complement), or the older x, y and columns: not both")
        data = dict(data)
        x, y = tuple(data.pop("x", (0.0, 1.0))), tuple(data.pop("y", (0.0, 1.0)))
        columns = data.pop("columns", "inside")
        if columns not in ("inside", "outside"):
            raise ValueError(f"columns must be inside or outside, got {columns!r}")
        Box(x=x, y=y)  # the bands' own check, before they are split
        if columns == "inside":
            data["boxes"] = [{"x": x, "y": y}]
        else:
            data["boxes"] = [{"x": (-_INF, x[0]), "y": y}, {"x": (x[1], _INF), "y": y}]
        return data

    def describe(self) -> str:
        """The region in words, in lung-box units."""

        def band(lo: float, hi: float) -> str:
            return f"{lo:.3g}–{hi:.3g}"

        union = " ∪ ".join(f"rows {band(*b.y)} × columns {band(*b.x)}" for b in self.boxes)
        return f"all but ({union})" if self.complement else union


PRIORS: Registry[RegionPrior] = Registry("region prior")


@PRIORS.register("lower_lung")
def _lower_lung() -> RegionPrior:
    return RegionPrior(boxes=[Box(y=(0.5, 1.0))])


@PRIORS.register("upper_lung")
def _upper_lung() -> RegionPrior:
    return RegionPrior(boxes=[Box(y=(0.0, 0.5))])


@PRIORS.register("outside_lung_columns_or_above")
def _outside_lung_columns_or_above() -> RegionPrior:
    """The authors' subcutaneous-emphysema region: all but the lung columns from the box top down."""
    return RegionPrior(boxes=[Box(y=(0.0, _INF))], complement=True)


@PRIORS.register("outside_lung_columns")
def _outside_lung_columns() -> RegionPrior:
    """Beside the lung columns, from the box top down (the rows above the box left out)."""
    return RegionPrior(boxes=[Box(x=(-_INF, 0.0), y=(0.0, _INF)), Box(x=(1.0, _INF), y=(0.0, _INF))])


@PRIORS.register("whole_lung")
def _whole_lung() -> RegionPrior:
    return RegionPrior(boxes=[Box()])


def create_prior(name: str) -> RegionPrior:
    return PRIORS.create(name)


DEFAULT_PRIORS: dict[str, RegionPrior] = {
    "Effusion": create_prior("lower_lung"),
    "Pneumothorax": create_prior("upper_lung"),
    "Subcutaneous Emphysema": create_prior("outside_lung_columns_or_above"),
}


def prior_from_boxes(
    lung_box: Sequence[float],
    lesion_box: Sequence[float],
    columns: Literal["auto", "inside", "outside"] = "auto",
    both_sides: bool = True,
) -> RegionPrior:
    """The prior of one annotated X-ray: its lesion box (x, y, w, h) in units of its lung box.

    ``columns="auto"`` picks ``outside`` when the lesion lies wholly beside the lung box's columns
    (subcutaneous emphysema: every column beside the box, in the lesion's rows), else ``inside``
    (the lesion's box). ``both_sides`` adds the box mirrored about the lung box's centre line, as
    a second box of the union (not the hull of the two, which would cover the mediastinum): a
    finding seen on one side of one patient may be on either side of the next.
    """
    lx, ly, lw, lh = (float(v) for v in lung_box)
    x, y, w, h = (float(v) for v in lesion_box)
    if lw <= 0 or lh <= 0 or w <= 0 or h <= 0:
        raise ValueError(
            f"boxes need positive width and height: lung {tuple(lung_box)}, lesion {tuple(lesion_box)}"
        )
    x0, x1 = (x - lx) / lw, (x + w - lx) / lw
    y0, y1 = round((y - ly) / lh, 4), round((y + h - ly) / lh, 4)
    if columns == "auto":
        columns = "outside" if x1 <= 0.0 or x0 >= 1.0 else "inside"
    if columns == "outside":  # every column beside the lung box, in these rows
        return RegionPrior(x=(0.0, 1.0), y=(y0, y1), columns="outside")
    band = Box(x=(round(x0, 4), round(x1, 4)), y=(y0, y1))
    if not both_sides:
        return RegionPrior(boxes=[band])
    m0, m1 = round(1.0 - x1, 4), round(1.0 - x0, 4)
    if m0 <= band.x[1] and band.x[0] <= m1:  # the bands overlap: their union is one band
        return RegionPrior(boxes=[Box(x=(min(m0, band.x[0]), max(m1, band.x[1])), y=(y0, y1))])
    return RegionPrior(boxes=sorted([band, Box(x=(m0, m1), y=(y0, y1))], key=lambda b: b.x))


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
    import torch

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
    existing[label] = {**prior.model_dump(mode="python"), "source": source}
    existing[label]["boxes"] = [{"x": list(b["x"]), "y": list(b["y"])} for b in existing[label]["boxes"]]
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
    """Per-class prior parameters ``(C, K, 6)``: for each of up to K boxes x0, x1, y0, y1, a
    box-present flag and the class's complement flag (K = the most boxes any class has).

    Class 0 (No Finding) and classes without a prior have no box, so their region is empty.
    """
    import torch

    found = [priors.get(name) if i > 0 else None for i, name in enumerate(classes)]
    k = max((len(p.boxes) for p in found if p is not None), default=1)
    table = torch.zeros(len(classes), k, 6)
    for c, p in enumerate(found):
        for j, b in enumerate(p.boxes if p is not None else ()):
            coords = [min(max(v, -1e6), 1e6) for v in (*b.x, *b.y)]  # ±inf → "to the image edge"
            table[c, j] = torch.tensor([*coords, 1.0, float(p.complement)])
    return table


def region_masks(boxes: torch.Tensor, labels: torch.Tensor, table: torch.Tensor, size: tuple[int, int]):
    """Batched region masks ``(B, 1, H, W)`` in {0, 1} for each image's labelled class.

    ``boxes`` (B, 4) lung boxes x, y, w, h in pixels at ``size``; ``labels`` (B,) class ids;
    ``table`` from :func:`prior_table`. A pixel (its centre) is in a box when x0 ≤ x < x1 and
    y0 ≤ y < y1. No Finding rows (and classes without a prior) are all zero.
    """
    import torch

    h, w = size
    p = table.to(boxes.device)[labels]  # (B, K, 6)
    bx, by, bw, bh = (v[:, None] for v in boxes.float().unbind(1))  # (B, 1) each
    x0, x1 = bx + p[..., 0] * bw, bx + p[..., 1] * bw  # (B, K)
    y0, y1 = by + p[..., 2] * bh, by + p[..., 3] * bh
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5  # pixel centres (W,)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5  # (H,)
    in_cols = (xs >= x0[..., None]) & (xs < x1[..., None])  # (B, K, W)
    in_rows = (ys >= y0[..., None]) & (ys < y1[..., None])  # (B, K, H)
    present = p[..., 4].bool()  # (B, K)
    union = (in_rows[..., :, None] & in_cols[..., None, :] & present[..., None, None]).any(dim=1)  # (B, H, W)
    has_region = present.any(dim=1)[:, None, None]  # (B, 1, 1)
    complement = p[:, 0, 5].bool()[:, None, None]  # (B, 1, 1)
    region = (union ^ complement) & has_region  # (B, H, W)
    return region[:, None].float()  # (B, 1, H, W)
