"""Pair lung-segmentation images with their masks by file stem, across the common public layouts.

* plain pairs: ``images/x.png`` ↔ ``masks/x.png``;
* "Chest X-ray Masks and Labels" / Shenzhen: ``CXR_png/CHNCXR_0001_0.png`` ↔ ``masks/CHNCXR_0001_0_mask.png``;
* Montgomery: ``ManualMask/leftMask/MCUCXR_0001_0.png`` + ``ManualMask/rightMask/…`` → their union;
* any tree of mask folders: every mask file whose stem (minus a ``_mask``/``-mask``/``_lung`` suffix)
  matches an image stem joins that image's union.

Images without a mask are skipped and counted (Shenzhen ships fewer masks than images).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_SUFFIXES

__all__ = ["MaskPairs", "find_pairs", "list_images"]

_SUFFIX = re.compile(r"([_\-. ]?(mask|masks|lung|lungs|seg|label))+$", re.IGNORECASE)


@dataclass
class MaskPairs:
    pairs: list[tuple[str, Path, list[Path]]]  # (stem, image, mask files to unite)
    images_without_mask: list[Path] = field(default_factory=list)
    masks_without_image: list[Path] = field(default_factory=list)


def list_images(directory: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``directory`` (sorted; hidden files skipped)."""
    it = directory.rglob("*") if recursive else directory.glob("*")
    return sorted(
        p for p in it if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _mask_key(path: Path) -> str:
    return _SUFFIX.sub("", path.stem)


def find_pairs(images_dir: str | Path, masks_dir: str | Path) -> MaskPairs:
    """Pair every image under ``images_dir`` with the mask files under ``masks_dir`` of its stem."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} {d}: not a directory")
    masks_root = masks_dir.resolve()
    images = [p for p in list_images(images_dir) if masks_root not in p.resolve().parents]
    if not images:
        raise FileNotFoundError(f"--images {images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            raise ValueError(f"two images share the stem {p.stem!r}: {by_stem[p.stem]} and {p}")
        by_stem[p.stem] = p
    masks: dict[str, list[Path]] = {}
    orphans: list[Path] = []
    for m in list_images(masks_dir):
        key = m.stem if m.stem in by_stem else _mask_key(m)
        if key in by_stem:
            masks.setdefault(key, []).append(m)
        else:
            orphans.append(m)
    pairs = [(stem, by_stem[stem], sorted(masks[stem])) for stem in sorted(by_stem) if stem in masks]
    missing = [by_stem[s] for s in sorted(by_stem) if s not in masks]
    return MaskPairs(pairs=pairs, images_without_mask=missing, masks_without_image=orphans)
