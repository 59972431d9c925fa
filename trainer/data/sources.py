"""Build a dataset cache from a phantom directory (labels.csv + PNGs + exact masks).

Phantoms carry exact lung masks, so no segmenter runs here (the header says so); the
`prepare` command builds caches from NIH, class folders and CSVs with the U-Net.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..tasks import classes_for
from .cache import CacheError, write_cache

__all__ = ["cache_from_phantoms"]

_REQUIRED = ("image_id", "patient_id", "label", "split", "path", "lung_mask_path", "lesion_mask_path")


def cache_from_phantoms(
    phantom_dir: str | Path, out_dir: str | Path, task: str, overwrite: bool = False
) -> Path:
    """Cache the phantom images whose label belongs to ``task`` (others are skipped)."""
    root = Path(phantom_dir).resolve()
    labels_csv = root / "labels.csv"
    classes = classes_for(task)
    try:
        with open(labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise CacheError(f"{labels_csv}: missing columns {missing}")
            rows = [r for r in reader if r["label"] in classes]
    except FileNotFoundError:
        raise CacheError(f"{labels_csv}: not found (generate phantoms first)") from None
    if not rows:
        raise CacheError(f"{labels_csv}: no image with a label of task {task!r} ({', '.join(classes)})")
    empty = [c for c in classes if not any(r["label"] == c for r in rows)]
    if empty:
        raise CacheError(f"{labels_csv}: no images of class(es) {empty} required by task {task!r}")

    def read(rel: str, row: int) -> np.ndarray:
        p = (root / rel).resolve()
        if root not in p.parents:
            raise CacheError(f"{labels_csv} row {row}: path {rel!r} escapes the phantom directory")
        try:
            with Image.open(p) as im:
                return np.asarray(im.convert("L"), dtype=np.uint8)
        except (FileNotFoundError, OSError) as e:
            raise CacheError(f"{labels_csv} row {row}: cannot read {p}: {e}") from None

    images = np.stack([read(r["path"], i + 2) for i, r in enumerate(rows)])
    lungs = np.stack([read(r["lung_mask_path"], i + 2) > 127 for i, r in enumerate(rows)]).astype(np.uint8)
    lesions = np.stack([read(r["lesion_mask_path"], i + 2) > 127 for i, r in enumerate(rows)]).astype(
        np.uint8
    )
    manifest = [
        {
            "image_id": r["image_id"],
            "patient_id": r["patient_id"],
            "label": r["label"],
            "split": r["split"],
            "source_path": r["path"],
            "marker": r.get("marker", ""),
        }
        for r in rows
    ]
    return write_cache(
        out_dir,
        images=images,
        lung_masks=lungs,
        lesion_masks=lesions,
        lesion_known=np.ones(len(rows), dtype=bool),
        manifest=manifest,
        classes=classes,
        task=task,
        source=f"phantoms:{root}",
        segmenter="ground-truth (phantom lung masks)",
        data_access="synthetic",
        overwrite=overwrite,
    )
