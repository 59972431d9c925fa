"""Build a dataset cache from source records: split, decode once, segment once, write atomically.

Work happens in chunks under ``.<out>.prepare/`` next to the output; each finished chunk is
saved, so an interrupted run resumes where it stopped (the plan's hash must match). The cache
itself is written by :func:`~trainer.data.cache.write_cache` (temporary directory, header
last, rename), with ``data_quality.json`` beside it: class counts per split, patient overlap
(checked to be 0), lung-box fallbacks, lung-area statistics, what was skipped and why.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache import DataAccess, write_cache
from .images import ImageReadError, read_gray, read_mask, resize_gray, resize_mask
from .sources import SourceError, manifest_rows
from .splits import SPLITS, Record, balance_and_limit, check_splits, make_splits, patient_overlap

__all__ = ["PrepareResult", "build_cache", "plan_splits", "prepare_cache", "quality_report", "write_dry_run"]

CHUNK = 256
_DRY_RUN_FILES = {"manifest.csv", "data_quality.json"}


@dataclass
class PrepareResult:
    path: Path
    quality: dict[str, Any]
    seconds: float = 0.0
    images_per_s: float = 0.0
    resumed_chunks: int = 0
    dry_run: bool = False  # only the split manifest and the counts were written


def plan_splits(
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    seed: int = 0,
    balance: bool = True,
    max_per_class: int | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    trainval_test: dict[str, str] | None = None,
    source: str = "data",
) -> tuple[list[Record], int]:
    """Give every record a split (unless given), balance, limit, check. Returns (kept, dropped).

    ``trainval_test`` (image id → ``trainval``/``test``, NIH's official lists) fixes the test split
    and splits the rest into train/val in the ratio of ``fractions``.
    """
    records = list(records)
    if trainval_test is not None:
        test = [r for r in records if trainval_test.get(r.image_id) == "test"]
        rest = [r for r in records if trainval_test.get(r.image_id) == "trainval"]
        for r in test:
            r.split = "test"
        f_train, f_val = fractions[0], fractions[1]
        make_splits(
            rest,
            classes,
            fractions=(f_train / (f_train + f_val), f_val / (f_train + f_val)),
            splits=("train", "val"),
            seed=seed,
            balance=balance,
        )
        overlap = patient_overlap(test + rest)
        if overlap:
            some = ", ".join(sorted(overlap)[:5])
            raise SourceError(
                f"{source}: the official split puts {len(overlap)} patient(s) in both, e.g. {some}"
            )
        records = test + rest
    elif any(r.split is None for r in records):
        make_splits(records, classes, fractions=fractions, seed=seed, balance=balance)
    kept, dropped = balance_and_limit(
        records, classes, seed=seed, balance=balance, max_per_class=max_per_class, fractions=fractions
    )
    kept.sort(key=lambda r: (SPLITS.index(r.split), classes.index(r.label), r.image_id))  # type: ignore[arg-type]
    check_splits(kept, classes, source)
    return kept, dropped


def quality_report(
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    skipped: Counter,
    dropped: int,
    patient_ids_known: bool,
    lung_masks: np.ndarray | None = None,
    fallback: np.ndarray | None = None,
    lesion_known: np.ndarray | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The data-quality figures of a prepared dataset (JSON-able)."""
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    patients: dict[str, set[str]] = {s: set() for s in SPLITS}
    for r in records:
        counts[r.split][r.label] += 1  # type: ignore[index]
        patients[r.split].add(r.patient_id)  # type: ignore[index]
    report: dict[str, Any] = {
        "images": len(records),
        "class_counts": counts,
        "patients": {s: len(p) for s, p in patients.items()},
        "patient_overlap": len(patient_overlap(records)),
        "patient_ids_known": patient_ids_known,
        "skipped_rows": dict(sorted(skipped.items())),
        "dropped_by_balancing_or_limit": dropped,
    }
    if lung_masks is not None:
        area = lung_masks.reshape(len(lung_masks), -1).mean(axis=1, dtype=np.float64)  # (N,)
        q = np.percentile(area, [0, 5, 50, 95, 100]) if len(area) else np.zeros(5)
        report["lung_area_fraction"] = {
            "mean": round(float(area.mean()) if len(area) else 0.0, 4),
            **{k: round(float(v), 4) for k, v in zip(("min", "p5", "median", "p95", "max"), q, strict=True)},
        }
    if fallback is not None:
        report["lung_box_fallbacks"] = int(fallback.sum())
        ids = [r.image_id for r, f in zip(records, fallback, strict=True) if f]
        report["lung_box_fallback_ids"] = ids[:50]
    if lesion_known is not None:
        report["lesion_ground_truth"] = int(lesion_known.sum())
    report.update(more)
    return report


def _check_out(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` may be replaced: absent, ``overwrite``, or only a dry run's files."""
    if not out.exists():
        return False
    if out.is_dir() and {p.name for p in out.iterdir()} <= _DRY_RUN_FILES:
        return True
    if overwrite:
        return True
    raise SourceError(f"{out} already exists (pass --overwrite to replace it)")


def write_dry_run(
    out: str | Path, records: Sequence[Record], quality: dict[str, Any], overwrite: bool
) -> Path:
    """Only the split manifest and the counts: no image is read."""
    out = Path(out).resolve()
    if _check_out(out, overwrite) and {p.name for p in out.iterdir()} - _DRY_RUN_FILES:
        shutil.rmtree(out)  # a cache or other files, replaced on --overwrite
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "manifest.csv", _manifest_csv(manifest_rows(records)))
    _atomic_write(out / "data_quality.json", json.dumps(quality, indent=2))
    return out


def _manifest_csv(rows: list[dict[str, str]]) -> str:
    base = ["image_id", "patient_id", "label", "split", "source_path"]
    columns = base + sorted({k for r in rows for k in r} - set(base))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows({c: r.get(c, "") for c in columns} for r in rows)
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the build ----------------------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def _plan_hash(records: Sequence[Record], size: int, segmenter_id: str, root: Path) -> str:
    h = hashlib.sha256(f"{size}|{segmenter_id}|{root}".encode())
    for r in records:
        h.update(
            f"{r.image_id}|{r.path}|{r.label}|{r.split}|{r.lung_mask_path}|{r.lesion_mask_path}|".encode()
        )
        h.update(repr(r.lesion_boxes).encode())
    return h.hexdigest()[:32]


def _load(root: Path, r: Record, size: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, bool]:
    """(image, lung mask or None, lesion mask, lesion known) of one record at ``size``."""
    try:
        img = read_gray(root / r.path)
        h, w = img.shape
        lung = resize_mask(read_mask(root / r.lung_mask_path), size) if r.lung_mask_path else None
        if r.lesion_mask_path:
            lesion, known = resize_mask(read_mask(root / r.lesion_mask_path), size), True
        else:
            lesion, known = np.zeros((size, size), dtype=np.uint8), bool(r.lesion_boxes)
            for x, y, bw, bh in r.lesion_boxes:  # source pixels → cache pixels
                x0, x1 = int(np.floor(x * size / w)), int(np.ceil((x + bw) * size / w))
                y0, y1 = int(np.floor(y * size / h)), int(np.ceil((y + bh) * size / h))
                lesion[max(0, y0) : min(size, y1), max(0, x0) : min(size, x1)] = 1
        return resize_gray(img, size), lung, lesion, known
    except ImageReadError as e:
        raise SourceError(f"{r.where}: {e}") from None


def build_cache(
    records: Sequence[Record],
    out: str | Path,
    *,
    root: str | Path,
    classes: Sequence[str],
    task: str,
    size: int,
    source: str,
    data_access: DataAccess,
    segmenter: Any | None = None,
    skipped: Counter | None = None,
    dropped: int = 0,
    patient_ids_known: bool = True,
    overwrite: bool = False,
    workers: int = 4,
    batch_size: int = 32,
    chunk: int = CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Decode, resize and segment every record once and write the cache (resumable by chunks).

    ``segmenter`` (a :class:`~trainer.segmenter.Segmenter`) runs on every image when given (its
    Dice against lung masks the source provides is reported); without it every record needs a
    ``lung_mask_path``.
    """
    t0 = time.perf_counter()
    root = Path(root).resolve()
    out = Path(out).resolve()
    replace = _check_out(out, overwrite)
    if segmenter is None and any(r.lung_mask_path is None for r in records):
        raise SourceError("no lung masks in the source: pass a segmenter checkpoint (--segmenter)")
    seg_id = segmenter.name if segmenter is not None else "ground-truth lung masks"
    work = out.parent / f".{out.name}.prepare"
    plan = _plan_hash(records, size, seg_id, root) + f"-{chunk}"
    state_file = work / "state.json"
    if work.exists():
        try:
            same = json.loads(state_file.read_text()).get("plan") == plan
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:  # another plan's leftovers: start over
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _atomic_write(state_file, json.dumps({"plan": plan, "n": len(records), "size": size}))
    n = len(records)
    n_chunks = (n + chunk - 1) // chunk
    resumed = 0
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for c in range(n_chunks):
            part = work / f"chunk_{c:05d}.npz"
            rows = records[c * chunk : (c + 1) * chunk]
            if part.is_file():
                resumed += 1
            else:
                loaded = list(pool.map(lambda r: _load(root, r, size), rows))
                images = np.stack([x[0] for x in loaded])  # (k, S, S)
                given = [x[1] for x in loaded]
                dice = np.full(len(rows), np.nan)  # segmenter vs given lung masks, where both exist
                if segmenter is not None:  # the segmenter runs on every image when one is given
                    lungs = segmenter.predict(images, batch_size=batch_size)
                    for i, g in enumerate(given):
                        if g is not None:
                            dice[i] = _dice(lungs[i], g)
                else:
                    lungs = np.stack(given)  # type: ignore[arg-type]
                tmp = part.with_name(f".{part.stem}.tmp.npz")
                np.savez(
                    tmp,
                    images=images,
                    lungs=lungs,
                    lesions=np.stack([x[2] for x in loaded]),
                    known=np.array([x[3] for x in loaded], dtype=bool),
                    dice=dice,
                )
                os.replace(tmp, part)
            done += len(rows)
            if progress is not None:
                progress(done, n)
    parts = [np.load(work / f"chunk_{c:05d}.npz") for c in range(n_chunks)]
    images = np.concatenate([p["images"] for p in parts])
    lungs = np.concatenate([p["lungs"] for p in parts])
    lesions = np.concatenate([p["lesions"] for p in parts])
    known = np.concatenate([p["known"] for p in parts])
    dice = np.concatenate([p["dice"] for p in parts])
    dice = dice[np.isfinite(dice)]
    fallback = lungs.reshape(n, -1).max(axis=1) == 0  # (N,) nothing found: whole-image box
    seconds = time.perf_counter() - t0
    quality = quality_report(
        records,
        classes,
        skipped=skipped or Counter(),
        dropped=dropped,
        patient_ids_known=patient_ids_known,
        lung_masks=lungs,
        fallback=fallback,
        lesion_known=known,
        segmenter=seg_id,
        segmenter_val_dice=_finite(getattr(getattr(segmenter, "meta", None), "val_dice", None)),
        size=size,
    )
    if len(dice):  # how well the segmenter reproduces the source's own lung masks
        quality["segmenter_dice_vs_given_masks"] = {
            "n": len(dice),
            "mean": round(float(dice.mean()), 4),
            "min": round(float(dice.min()), 4),
        }
    path = write_cache(
        out,
        images=images,
        lung_masks=lungs,
        lesion_masks=lesions,
        lesion_known=known,
        manifest=manifest_rows(records),
        classes=classes,
        task=task,
        source=source,
        segmenter=seg_id,
        data_access=data_access,
        extra={"lung_box_fallbacks": int(fallback.sum())},
        extra_files={"data_quality.json": json.dumps(quality, indent=2)},
        overwrite=replace,
    )
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return PrepareResult(path, quality, seconds, n / seconds if seconds else 0.0, resumed)


def prepare_cache(
    records: Sequence[Record],
    skipped: Counter,
    *,
    task: str,
    out: str | Path,
    root: str | Path,
    source: str,
    data_access: DataAccess,
    segmenter: str | Path | None = None,
    size: int = 224,
    seed: int = 0,
    balance: bool = True,
    max_per_class: int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    workers: int = 4,
    official: dict[str, str] | None = None,
    patient_ids_known: bool = True,
    segmenter_size: int | None = None,
    segmenter_encoder: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """A source's records → a dataset cache: plan the splits (:func:`plan_splits`), then either
    write the split manifest alone (``dry_run``: no image is read) or build the cache with the
    lung U-Net checkpoint ``segmenter`` (refused unless trained at ``segmenter_size`` px with
    ``segmenter_encoder``, when those are given)."""
    from ..tasks import classes_for

    classes = classes_for(task)
    kept, dropped = plan_splits(
        records,
        classes,
        seed=seed,
        balance=balance,
        max_per_class=max_per_class,
        trainval_test=official,
        source=source,
    )
    if dry_run:
        quality = quality_report(
            kept, classes, skipped=skipped, dropped=dropped, patient_ids_known=patient_ids_known, seed=seed
        )
        return PrepareResult(write_dry_run(out, kept, quality, overwrite), quality, dry_run=True)
    seg = None
    if segmenter is not None:
        from ..segmenter import load_segmenter

        seg = load_segmenter(segmenter, expect_input_size=segmenter_size, expect_encoder=segmenter_encoder)
    return build_cache(
        kept,
        out,
        root=root,
        classes=classes,
        task=task,
        size=size,
        source=source,
        data_access=data_access,
        segmenter=seg,
        skipped=skipped,
        dropped=dropped,
        patient_ids_known=patient_ids_known,
        overwrite=overwrite,
        workers=workers,
        progress=progress,
    )
