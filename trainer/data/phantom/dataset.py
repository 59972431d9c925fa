"""A phantom data set: labels, patient-disjoint splits and markers drawn from one seed, in memory
(:func:`synthesize`) or written as PNGs, masks and a labels CSV (:func:`generate`)."""

from __future__ import annotations

import csv
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...tasks import CLASS_NAMES, NO_FINDING
from ..splits import SPLITS, split_counts
from .anatomy import sample_anatomy
from .render import draw

__all__ = ["CSV_COLUMNS", "SHORTCUT_KEYS", "PhantomSet", "check_classes", "generate", "synthesize"]

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


def check_classes(classes: Sequence[str]) -> tuple[str, ...]:
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
    if out[0] != NO_FINDING:
        raise ValueError(f"the first class must be 'No Finding' (the negative class), got {out[0]!r}")
    if len(set(out)) != len(out):
        dup = next(c for c in out if out.count(c) > 1)
        raise ValueError(f"duplicate class {dup!r} in {list(out)}")
    return out


def check_shortcut(shortcut: Mapping[str, float] | None) -> dict[str, float] | None:
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
    classes = check_classes(classes)
    sc = check_shortcut(shortcut)
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
        anat = sample_anatomy(np.random.default_rng(pat_seeds[p]))
        for _ in range(int(per_patient[p])):
            r = np.random.default_rng(img_seeds[i])
            images[i], lung_masks[i], lesion_masks[i] = draw(anat, r, classes[lab[i]], bool(markers[i]), size)
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
