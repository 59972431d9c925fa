"""Where images come from: NIH ChestX-ray14 metadata, a class-folder tree, a generic CSV, phantoms.

Each reader returns :class:`~trainer.data.splits.Record` rows (paths relative to the data root,
never escaping it) plus counts of what it skipped and why; `prepare` turns them into a cache.
Errors name the file and row (CSV line numbers count the header as line 1).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..tasks import NO_FINDING, TASKS, classes_for
from .cache import CacheError, write_cache
from .images import IMAGE_SUFFIXES, ImageReadError, read_gray, read_mask
from .splits import SPLITS, Record

__all__ = [
    "SourceError",
    "cache_from_phantoms",
    "canonical_label",
    "csv_records",
    "folder_records",
    "nih_records",
    "read_official_split",
    "resolve_under",
]


class SourceError(UserError):
    """Bad source data: missing columns, unknown labels, duplicate ids, paths outside the root..."""


_KNOWN = {re.sub(r"[^a-z]", "", c.lower()): c for t in TASKS.values() for c in t}
_ALIASES = {"normal": NO_FINDING, "healthy": NO_FINDING, "pleuraleffusion": "Effusion", "ptx": "Pneumothorax"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
_SPLIT_ALIASES |= {"test": "test", "testing": "test"}


def canonical_label(name: str) -> str | None:
    """The class name for a label spelling (``no_finding``, ``Normal``, ``effusion``...) or None."""
    key = re.sub(r"[^a-z]", "", name.lower())
    return _KNOWN.get(key) or _ALIASES.get(key)


def resolve_under(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` resolved; a path that leaves ``root`` (``../``, absolute elsewhere) is an error."""
    if not rel or not rel.strip():
        raise SourceError(f"{where}: empty path")
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise SourceError(f"{where}: path {rel!r} escapes the data root {root}")
    return p


def _relative(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise SourceError(f"{path}: not found") from None


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with _open_text(path) as f:
        try:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise SourceError(f"{path}: missing required column(s) {missing}; columns found: {fields}")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        except (csv.Error, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
            raise SourceError(f"{path}: not a readable CSV ({e})") from None


def _check_unique(records: Sequence[Record]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.image_id in seen:
            raise SourceError(f"duplicate image id {r.image_id!r}: {seen[r.image_id]} and {r.where}")
        seen[r.image_id] = r.where


def _task_label(raw: str, classes: Sequence[str], where: str, skipped: Counter, count: int = 1) -> str | None:
    label = canonical_label(raw)
    if label is None:
        valid = sorted({*_KNOWN.values()})
        raise SourceError(f"{where}: unknown label {raw!r}; known labels: {valid}")
    if label not in classes:
        skipped[f"label not in task ({label})"] += count
        return None
    return label


def _check_classes(records: Sequence[Record], classes: Sequence[str], source: str, filters: str) -> None:
    have = Counter(r.label for r in records)
    empty = [c for c in classes if have[c] == 0]
    if empty:
        raise SourceError(f"{source}: no images of class(es) {empty} after filtering ({filters})")


# ---- NIH ChestX-ray14 ---------------------------------------------------------------------------
_NIH_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")
_NIH_TASKS = ("ne", "np", "nep")


def index_images(root: Path) -> dict[str, Path]:
    """File name → path of every image under ``root`` (NIH: ``images_001/images/*.png`` or flat)."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and name not in out:
                out[name] = Path(dirpath) / name
    return out


def nih_records(
    csv_path: str | Path,
    task: str,
    *,
    images_dir: str | Path | None = None,
    view: str = "both",
    bbox_csv: str | Path | None = None,
) -> tuple[list[Record], Counter]:
    """Single-label rows of the task's classes from ``Data_Entry_2017*.csv[.gz]``.

    ``images_dir`` (optional for a dry run) is indexed once; a selected image missing there is an
    error. ``bbox_csv`` (``BBox_List_2017.csv``) adds ground-truth lesion boxes.
    """
    if task not in _NIH_TASKS:
        raise SourceError(
            f"task {task!r}: NIH ChestX-ray14 has no 'Subcutaneous Emphysema' label (its 'Emphysema' is "
            f"pulmonary emphysema); NIH tasks: {', '.join(_NIH_TASKS)}"
        )
    if view not in ("PA", "AP", "both"):
        raise SourceError(f"view must be PA, AP or both, got {view!r}")
    classes = classes_for(task)
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, _NIH_REQUIRED)
    root = Path(images_dir).resolve() if images_dir else None
    if root is not None and not root.is_dir():
        raise SourceError(f"--images {root}: not a directory")
    index = index_images(root) if root is not None else {}
    boxes = _nih_boxes(Path(bbox_csv)) if bbox_csv else {}
    skipped: Counter = Counter()
    records: list[Record] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        name = row["Image Index"]
        where = f"{csv_path.name}:{line}"
        if name in seen:
            raise SourceError(f"{where}: duplicate image id {name!r} (first at line {seen[name]})")
        seen[name] = line
        labels = row["Finding Labels"]
        if "|" in labels:
            skipped["multi-label"] += 1
            continue
        if labels not in classes:
            skipped["label not in task"] += 1
            continue
        if view != "both" and row["View Position"] != view:
            skipped[f"view not {view}"] += 1
            continue
        if not row["Patient ID"]:
            raise SourceError(f"{where}: empty Patient ID")
        path = name
        if root is not None:
            found = index.get(name)
            if found is None:
                raise SourceError(f"{where}: image {name!r} not found under {root}")
            path = _relative(root, found)
        records.append(
            Record(
                image_id=name,
                patient_id=str(int(row["Patient ID"])) if row["Patient ID"].isdigit() else row["Patient ID"],
                label=labels,
                path=path,
                where=where,
                view=row["View Position"],
                lesion_boxes=[b for lab, b in boxes.get(name, []) if lab == labels],
            )
        )
    _check_classes(records, classes, str(csv_path), f"single-label rows, view {view}")
    return records, skipped


def _nih_boxes(path: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """``BBox_List_2017.csv``: image → [(label, (x, y, w, h))] in the 1024-px image's pixels."""
    out: dict[str, list] = {}
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "Image Index" or len(header) < 3:
            raise SourceError(f"{path}: not a BBox_List_2017 file (first column must be 'Image Index')")
        for line, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            try:
                x, y, w, h = (float(v) for v in row[2:6])
            except ValueError:
                raise SourceError(f"{path}:{line}: bounding box {row[2:6]} is not four numbers") from None
            out.setdefault(row[0].strip(), []).append((row[1].strip(), (x, y, w, h)))
    return out


def read_official_split(directory: str | Path) -> dict[str, str]:
    """Image → ``trainval``/``test`` from NIH's ``train_val_list.txt`` and ``test_list.txt``."""
    d = Path(directory)
    out: dict[str, str] = {}
    for fname, split in (("train_val_list.txt", "trainval"), ("test_list.txt", "test")):
        f = d / fname
        if not f.is_file():
            raise SourceError(f"--official-split: {f} not found")
        for name in f.read_text().split():
            if out.get(name, split) != split:
                raise SourceError(f"{f}: {name} is listed in both train_val_list.txt and test_list.txt")
            out[name] = split
    return out


# ---- class folders ------------------------------------------------------------------------------
def folder_records(
    root: str | Path, task: str, *, patient_regex: str | None = None
) -> tuple[list[Record], Counter]:
    """``root/{train,val,test}/<class>/*.png`` (splits given) or ``root/<class>/*.png`` (splits made).

    Class folders are matched to class names loosely (``no_finding``, ``Normal``, ``effusion``).
    ``patient_regex`` extracts the patient id from the file stem (group ``patient`` or group 1);
    without it every image is its own patient and the quality report says so.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    classes = classes_for(task)
    pattern = _compile(patient_regex)
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [(p, _SPLIT_ALIASES[p.name.lower()]) for p in tops if p.name.lower() in _SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(tops):
        others = [p.name for p in tops if p.name.lower() not in _SPLIT_ALIASES]
        raise SourceError(f"{root}: mixes split folders and other folders {others}; use one layout")
    groups = split_dirs or [(root, None)]
    skipped: Counter = Counter()
    records: list[Record] = []
    for base, split in groups:
        for cdir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = [
                f
                for f in sorted(cdir.rglob("*"))
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
            ]
            label = _task_label(cdir.name, classes, f"{cdir}", skipped, len(files))
            if label is None:
                continue
            for f in files:
                rel = _relative(root, f.resolve()) if root in f.resolve().parents else None
                if rel is None:
                    raise SourceError(f"{f}: resolves outside the data root {root} (a symlink?)")
                records.append(
                    Record(
                        image_id=f.stem,
                        patient_id=_patient(pattern, f.stem, rel),
                        label=label,
                        path=rel,
                        where=rel,
                        split=split,
                    )
                )
    _check_unique(records)
    _check_classes(records, classes, str(root), "class folders of the task")
    return records, skipped


def _compile(patient_regex: str | None) -> re.Pattern | None:
    if patient_regex is None:
        return None
    try:
        pat = re.compile(patient_regex)
    except re.error as e:
        raise SourceError(f"--patient-regex {patient_regex!r}: {e}") from None
    if pat.groups == 0:
        raise SourceError(f"--patient-regex {patient_regex!r}: needs a group (the patient id)")
    return pat


def _patient(pattern: re.Pattern | None, stem: str, where: str) -> str:
    if pattern is None:
        return f"image:{stem}"
    m = pattern.search(stem)
    if not m:
        raise SourceError(f"{where}: --patient-regex {pattern.pattern!r} does not match {stem!r}")
    return m.group("patient") if "patient" in pattern.groupindex else m.group(1)


# ---- generic CSV --------------------------------------------------------------------------------
_CSV_REQUIRED = ("path", "label", "patient_id")
_CSV_KNOWN = {"image_id", "split", "view", "lung_mask_path", "lesion_mask_path", *_CSV_REQUIRED}


def csv_records(
    csv_path: str | Path, task: str, *, root: str | Path | None = None
) -> tuple[list[Record], Counter]:
    """Rows ``path, label, patient_id`` (+ optional ``image_id``, ``split``, ``view``,
    ``lung_mask_path``, ``lesion_mask_path``; other columns travel to the manifest).

    Paths are relative to ``root`` (default: the CSV's folder) and may not leave it.
    """
    csv_path = Path(csv_path)
    root = Path(root).resolve() if root else csv_path.resolve().parent
    classes = classes_for(task)
    rows = _read_csv(csv_path, _CSV_REQUIRED)
    skipped: Counter = Counter()
    records: list[Record] = []
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path.name}:{line}"
        label = _task_label(row["label"], classes, where, skipped)
        if label is None:
            continue
        if not row["patient_id"]:
            raise SourceError(f"{where}: empty patient_id")
        path = resolve_under(root, row["path"], where)
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in _SPLIT_ALIASES:
                raise SourceError(f"{where}: split {split!r} is not one of {list(SPLITS)}")
            split = _SPLIT_ALIASES[split.lower()]
        masks = {}
        for col in ("lung_mask_path", "lesion_mask_path"):
            if row.get(col):
                masks[col] = _relative(root, resolve_under(root, row[col], f"{where} ({col})"))
        records.append(
            Record(
                image_id=row.get("image_id") or Path(row["path"]).stem,
                patient_id=row["patient_id"],
                label=label,
                path=_relative(root, path),
                where=where,
                split=split,
                view=row.get("view", ""),
                extra={k: v for k, v in row.items() if k not in _CSV_KNOWN},
                **masks,
            )
        )
    given = {r.split is not None for r in records}
    if len(given) > 1:
        first = next(r for r in records if r.split is None)
        raise SourceError(f"{first.where}: split is empty while other rows give one; fill all or none")
    _check_unique(records)
    _check_classes(records, classes, str(csv_path), f"labels of task {task}")
    return records, skipped


# ---- phantoms (exact masks, no segmenter) -------------------------------------------------------
def cache_from_phantoms(
    phantom_dir: str | Path, out_dir: str | Path, task: str, overwrite: bool = False
) -> Path:
    """Cache the phantom images whose label belongs to ``task`` (others are skipped), with the
    phantoms' exact lung and lesion masks (the header says no segmenter ran)."""
    root = Path(phantom_dir).resolve()
    labels_csv = root / "labels.csv"
    if not labels_csv.is_file():
        raise CacheError(f"{labels_csv}: not found (generate phantoms first)")
    classes = classes_for(task)
    try:
        records, _ = csv_records(labels_csv, task)
    except SourceError as e:
        raise CacheError(str(e)) from None
    missing = [r.where for r in records if not (r.lung_mask_path and r.lesion_mask_path)]
    if missing:
        raise CacheError(f"{labels_csv}: rows without lung_mask_path/lesion_mask_path, e.g. {missing[:3]}")

    def read(rel: str, where: str, mask: bool) -> np.ndarray:
        try:
            return read_mask(root / rel) if mask else read_gray(root / rel)
        except ImageReadError as e:
            raise CacheError(f"{where}: {e}") from None

    images = np.stack([read(r.path, r.where, False) for r in records])
    lungs = np.stack([read(r.lung_mask_path, r.where, True) for r in records])  # type: ignore[arg-type]
    lesions = np.stack([read(r.lesion_mask_path, r.where, True) for r in records])  # type: ignore[arg-type]
    return write_cache(
        out_dir,
        images=images,
        lung_masks=lungs,
        lesion_masks=lesions,
        lesion_known=np.ones(len(records), dtype=bool),
        manifest=[_manifest_row(r) for r in records],
        classes=classes,
        task=task,
        source=f"phantoms:{root}",
        segmenter="ground-truth (phantom lung masks)",
        data_access="synthetic",
        overwrite=overwrite,
    )


def _manifest_row(r: Record) -> dict[str, str]:
    return {
        "image_id": r.image_id,
        "patient_id": r.patient_id,
        "label": r.label,
        "split": r.split or "",
        "source_path": r.path,
        **({"view": r.view} if r.view else {}),
        **r.extra,
    }


def manifest_rows(records: Iterable[Record]) -> list[dict[str, str]]:
    """Manifest rows (DESIGN.md §3) of split records."""
    return [_manifest_row(r) for r in records]
