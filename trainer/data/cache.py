"""The dataset cache: the contract between `prepare` and trials (DESIGN.md §3).

One directory per prepared dataset::

    header.json        size, classes, task, source, segmenter, data_access, created, n, content_hash
    manifest.csv       image_id, patient_id, label, split, source_path (+ optional columns)
    images.npy         (N, S, S) uint8   — memory-mapped by trials
    lung_masks.npy     (N, S, S) uint8 in {0, 1}
    lung_boxes.npy     (N, 4) int32       x, y, w, h at S
    lesion_masks.npy   (N, S, S) uint8 in {0, 1}   ground truth where known
    lesion_known.npy   (N,) bool          whether the lesion mask of that row is ground truth

The directory is written under a temporary name and renamed into place with the header
written last, so a crash never leaves a cache a trial would accept. Trials never decode
source images nor run the segmenter.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import UserError
from .boxes import boxes_from_masks
from .splits import SPLITS

__all__ = [
    "CACHE_FORMAT_VERSION",
    "SHAREABLE_ACCESS",
    "Cache",
    "CacheDataset",
    "CacheError",
    "collate_batch",
    "open_cache",
    "read_header",
    "write_cache",
]

CACHE_FORMAT_VERSION = 1
DataAccess = Literal["synthetic", "public", "private"]
SHAREABLE_ACCESS = ("synthetic", "public")  # datasets whose images may leave the cluster
_ARRAYS = ("images", "lung_masks", "lung_boxes", "lesion_masks", "lesion_known")
_MANIFEST_COLUMNS = ("image_id", "patient_id", "label", "split", "source_path")


class CacheError(UserError):
    """A missing, incomplete, corrupted or mismatched dataset cache (the message names the file)."""


# ---- writing ------------------------------------------------------------------------------------
def write_cache(
    out_dir: str | Path,
    *,
    images: np.ndarray,
    lung_masks: np.ndarray,
    manifest: Sequence[dict[str, Any]],
    classes: Sequence[str],
    task: str,
    source: str,
    segmenter: str,
    data_access: DataAccess,
    lung_boxes: np.ndarray | None = None,
    lesion_masks: np.ndarray | None = None,
    lesion_known: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a cache atomically and return its path.

    ``images``/``lung_masks`` ``(N, S, S)`` uint8; ``manifest`` N dicts with at least
    image_id, patient_id, label (a class name), split, source_path. Lung boxes default to the
    union box of each lung mask (whole image when the mask is empty). ``extra_files`` (name →
    text, e.g. the data-quality report) are written beside the arrays, outside the content hash.
    """
    out = Path(out_dir).resolve()
    n = len(manifest)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise CacheError(f"images must be (N, S, S), got {images.shape}")
    size = int(images.shape[1])
    if images.shape[0] != n or lung_masks.shape != images.shape:
        raise CacheError(
            f"{n} manifest rows, images {images.shape}, lung masks {lung_masks.shape}: counts must agree"
        )
    for i, row in enumerate(manifest):
        missing = [c for c in _MANIFEST_COLUMNS if c not in row]
        if missing:
            raise CacheError(f"manifest row {i}: missing columns {missing}")
        if row["label"] not in classes:
            raise CacheError(f"manifest row {i} ({row['image_id']}): label {row['label']!r} not in {classes}")
        if row["split"] not in SPLITS:
            raise CacheError(f"manifest row {i} ({row['image_id']}): split {row['split']!r} not in {SPLITS}")
    ids = [str(r["image_id"]) for r in manifest]
    if len(set(ids)) != n:
        raise CacheError("manifest: duplicate image_id values")
    if lung_boxes is None:
        boxes, _ = boxes_from_masks(torch.from_numpy(np.ascontiguousarray(lung_masks)))
        lung_boxes = boxes.numpy()
    if lesion_masks is None:
        lesion_masks = np.zeros_like(images)
        lesion_known = np.zeros(n, dtype=bool)
    elif lesion_known is None:
        lesion_known = np.ones(n, dtype=bool)

    arrays = {
        "images": np.ascontiguousarray(images, dtype=np.uint8),
        "lung_masks": np.ascontiguousarray(lung_masks > 0, dtype=np.uint8),
        "lung_boxes": np.ascontiguousarray(lung_boxes, dtype=np.int32),
        "lesion_masks": np.ascontiguousarray(lesion_masks > 0, dtype=np.uint8),
        "lesion_known": np.ascontiguousarray(lesion_known, dtype=bool),
    }
    if out.exists() and not overwrite:
        raise CacheError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        columns = list(_MANIFEST_COLUMNS) + sorted({k for r in manifest for k in r} - set(_MANIFEST_COLUMNS))
        with open(tmp / "manifest.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({c: r.get(c, "") for c in columns} for r in manifest)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        header = {
            "format_version": CACHE_FORMAT_VERSION,
            "size": size,
            "n": n,
            "classes": list(classes),
            "task": task,
            "source": source,
            "segmenter": segmenter,
            "data_access": data_access,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "content_hash": _content_hash(tmp),
            **(extra or {}),
        }
        (tmp / "header.json").write_text(json.dumps(header, indent=2))  # last: marks the cache complete
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _content_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for name in (*(f"{a}.npy" for a in _ARRAYS), "manifest.csv"):
        h.update(name.encode())
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# ---- reading ------------------------------------------------------------------------------------
@dataclass
class Cache:
    """An opened cache: header, manifest rows and memory-mapped arrays."""

    path: Path
    header: dict[str, Any]
    manifest: list[dict[str, str]]
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    lung_masks: np.ndarray  # (N, S, S) uint8
    lung_boxes: np.ndarray  # (N, 4) int32
    lesion_masks: np.ndarray  # (N, S, S) uint8
    lesion_known: np.ndarray  # (N,) bool
    labels: np.ndarray  # (N,) int64 class ids

    @property
    def classes(self) -> list[str]:
        return list(self.header["classes"])

    @property
    def size(self) -> int:
        return int(self.header["size"])

    @property
    def data_access(self) -> str:
        return str(self.header.get("data_access", "private"))

    def split_indices(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.manifest) if r["split"] == split], dtype=np.int64)


def read_header(path: str | Path) -> dict[str, Any]:
    """A cache's ``header.json`` without opening the cache, or ``{}`` where it cannot be read (a
    cache on another machine: the tags and model card of a run then leave its identity out)."""
    try:
        return json.loads((Path(path) / "header.json").read_text())
    except (OSError, ValueError):
        return {}


def open_cache(path: str | Path, *, classes: Sequence[str] | None = None, verify: bool = True) -> Cache:
    """Open and validate a cache; ``classes`` (if given) must be those it was built for.

    ``verify`` re-hashes the content against the header (seconds for NIH-sized caches).
    """
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"data.cache: {path} is not a directory (build it with `cxr-sweep prepare`)")
    header_file = path / "header.json"
    if not header_file.is_file():
        raise CacheError(f"{header_file}: missing — the cache is incomplete (was its build interrupted?)")
    try:
        header = json.loads(header_file.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{header_file}: corrupted JSON: {e}") from None
    if header.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{header_file}: format_version {header.get('format_version')!r}, "
            f"this version reads {CACHE_FORMAT_VERSION}; rebuild the cache"
        )
    if classes is not None and list(classes) != list(header["classes"]):
        raise CacheError(
            f"{path}: built for classes {header['classes']} ({len(header['classes'])}) "
            f"(task {header.get('task')!r}), the config asks for {list(classes)} ({len(classes)})"
        )
    arrays: dict[str, np.ndarray] = {}
    for name in _ARRAYS:
        f = path / f"{name}.npy"
        try:
            arrays[name] = np.load(f, mmap_mode="r")
        except FileNotFoundError:
            raise CacheError(f"{f}: missing") from None
        except (ValueError, OSError) as e:
            raise CacheError(f"{f}: unreadable or corrupted: {e}") from None
    n, s = int(header["n"]), int(header["size"])
    expected = {
        "images": (n, s, s),
        "lung_masks": (n, s, s),
        "lung_boxes": (n, 4),
        "lesion_masks": (n, s, s),
        "lesion_known": (n,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise CacheError(f"{path / (name + '.npy')}: shape {arrays[name].shape}, header says {shape}")
    manifest_file = path / "manifest.csv"
    try:
        with open(manifest_file, newline="") as f:
            manifest = list(csv.DictReader(f))
    except FileNotFoundError:
        raise CacheError(f"{manifest_file}: missing") from None
    if len(manifest) != n:
        raise CacheError(f"{manifest_file}: {len(manifest)} rows, header says {n}")
    if verify:
        digest = _content_hash(path)
        if digest != header.get("content_hash"):
            raise CacheError(
                f"{path}: content hash mismatch — the cache was modified or corrupted; rebuild it"
            )
    index = {c: i for i, c in enumerate(header["classes"])}
    try:
        labels = np.array([index[r["label"]] for r in manifest], dtype=np.int64)
    except KeyError as e:
        raise CacheError(f"{manifest_file}: label {e.args[0]!r} is not one of {header['classes']}") from None
    return Cache(path=path, header=header, manifest=manifest, labels=labels, **arrays)


class CacheDataset(torch.utils.data.Dataset):
    """One split of a cache as a torch Dataset of uint8 tensors (normalisation happens on device).

    ``ds[i]`` gives one sample; ``ds.__getitems__(idx)`` (used by DataLoader) gives a whole
    batch with one fancy-index read per array. ``masks=False`` leaves out the lung and lesion
    masks (two thirds of a batch's bytes), which a training pass without augmentation never
    reads: the lung box comes with the batch.
    """

    def __init__(self, cache: Cache, split: str, masks: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cache = cache
        self.split = split
        self.masks = masks
        self.indices = cache.split_indices(split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, items: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.indices[np.asarray(items, dtype=np.int64)]  # (B,)
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on the memmap
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        srt = rows[order]
        c = self.cache

        def take(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[srt][inv]))

        batch = {
            "image": take(c.images)[:, None],  # (B, 1, S, S) uint8
            "box": take(c.lung_boxes).long(),  # (B, 4)
            "lesion_known": take(c.lesion_known),  # (B,) bool
            "label": torch.from_numpy(c.labels[rows]),  # (B,)
            "index": torch.from_numpy(rows),  # (B,)
        }
        if self.masks:
            batch["lung"] = take(c.lung_masks)[:, None]  # (B, 1, S, S) uint8
            batch["lesion"] = take(c.lesion_masks)[:, None]  # (B, 1, S, S) uint8
        return batch


def collate_batch(batch: Any) -> Any:
    """DataLoader collate for :class:`CacheDataset`: batches arrive already stacked."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)
