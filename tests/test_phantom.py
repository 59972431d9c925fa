"""Tests for the synthetic chest X-ray phantoms (trainer.data.phantom)."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from trainer.data.phantom import (
    CLASS_NAMES,
    PhantomSet,
    anatomy,
    generate,
    lesions,
    montage,
    render,
    synthesize,
)
from trainer.data.phantom.montage import main as phantom_cli

FINDINGS = CLASS_NAMES[1:]


@pytest.fixture(scope="module")
def ds64() -> PhantomSet:
    """~120 images at 64 px, all four classes."""
    return synthesize(60, CLASS_NAMES, size=64, seed=11)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """x, y, w, h of a non-empty mask (same convention as trainer.data.boxes)."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1] + 1 - cols[0]), int(rows[-1] + 1 - rows[0])


def _same(a: PhantomSet, b: PhantomSet) -> bool:
    return (
        a.image_ids == b.image_ids
        and a.patient_ids == b.patient_ids
        and a.labels == b.labels
        and a.splits == b.splits
        and np.array_equal(a.markers, b.markers)
        and np.array_equal(a.images, b.images)
        and np.array_equal(a.lung_masks, b.lung_masks)
        and np.array_equal(a.lesion_masks, b.lesion_masks)
    )


def test_deterministic_per_seed() -> None:
    kw = dict(size=64, shortcut={"trainval": 0.5, "test": -0.5})
    a = synthesize(8, CLASS_NAMES, seed=3, **kw)
    b = synthesize(8, CLASS_NAMES, seed=3, **kw)
    c = synthesize(8, CLASS_NAMES, seed=4, **kw)
    assert _same(a, b)
    assert not np.array_equal(a.images[: len(c)], c.images[: len(a)])


def test_shapes_dtypes_and_masks(ds64: PhantomSet) -> None:
    n = len(ds64)
    assert n >= 60
    for arr in (ds64.images, ds64.lung_masks, ds64.lesion_masks):
        assert arr.shape == (n, 64, 64) and arr.dtype == np.uint8
    assert ds64.markers.shape == (n,) and ds64.markers.dtype == bool
    assert not ds64.markers.any()  # shortcut=None
    assert set(np.unique(ds64.lung_masks)) == {0, 1}
    assert set(np.unique(ds64.lesion_masks)) <= {0, 1}
    assert all(len(x) == n for x in (ds64.image_ids, ds64.patient_ids, ds64.labels, ds64.splits))
    assert ds64.image_ids[0] == "ph000000" and len(set(ds64.image_ids)) == n
    assert all(p.startswith("p") and len(p) == 6 for p in ds64.patient_ids)
    assert ds64.classes == CLASS_NAMES
    assert [CLASS_NAMES[i] for i in ds64.label_indices] == ds64.labels
    for i, label in enumerate(ds64.labels):
        lung, les = ds64.lung_masks[i], ds64.lesion_masks[i]
        assert 0.1 < lung.mean() < 0.5, "lung fields should cover a sensible part of the image"
        assert lung[:, :32].any() and lung[:, 32:].any(), "two lung fields"
        assert les.any() == (label != "No Finding"), (i, label)
        # dark lungs, black background, bright mediastinum
        img = ds64.images[i].astype(float)
        assert img[lung > 0].mean() < img[40:56, 30:34].mean() - 40
        assert img[48:, :2].mean() < 40


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sizes(size: int) -> None:
    ds = synthesize(4, CLASS_NAMES, size=size, seed=size, images_per_patient=(2, 2))
    assert ds.images.shape == (8, size, size)
    for i, label in enumerate(ds.labels):
        assert ds.lesion_masks[i].any() == (label != "No Finding")
        assert ds.lung_masks[i].any()


def _lesion_fractions(ds: PhantomSet) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in FINDINGS}
    for i, label in enumerate(ds.labels):
        if label == "No Finding":
            continue
        x, y, w, h = _box(ds.lung_masks[i] > 0)
        yy, xx = np.nonzero(ds.lesion_masks[i])
        if label == "Effusion":
            inside = (yy + 0.5 >= y + h / 2) & (yy < y + h) & (xx >= x) & (xx < x + w)
        elif label == "Pneumothorax":
            inside = (yy + 0.5 < y + h / 2) & (yy >= y) & (xx >= x) & (xx < x + w)
        else:
            inside = (xx < x) | (xx >= x + w)
        out[label].append(float(inside.mean()))
    return out


@pytest.mark.parametrize("size", [64, 128])
def test_lesions_where_they_belong(ds64: PhantomSet, size: int) -> None:
    ds = ds64 if size == 64 else synthesize(12, CLASS_NAMES, size=128, seed=5)
    fracs = _lesion_fractions(ds)
    for label, values in fracs.items():
        assert values, label
        assert min(values) >= 0.9, (label, min(values))
    # effusion and pneumothorax lie inside the lung fields, emphysema outside them
    for i, label in enumerate(ds.labels):
        les, lung = ds.lesion_masks[i] > 0, ds.lung_masks[i] > 0
        if label in ("Effusion", "Pneumothorax"):
            assert not (les & ~lung).any()
        elif label == "Subcutaneous Emphysema":
            assert not (les & lung).any()


@pytest.mark.parametrize("label", FINDINGS)
def test_lesion_is_visible(label: str) -> None:
    """Same anatomy, exposure and noise with and without the finding: the lesion region changes."""
    sign = 1.0 if label == "Effusion" else -1.0  # fluid is dense (bright), air is lucent (dark)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        anat = anatomy.sample_anatomy(rng)
        view = anatomy.sample_view(rng)
        lesion = lesions.sample_lesion(rng, label, anat)
        img1, lung1, les1 = render.render(anat, view, lesion, False, 64)
        img0, lung0, les0 = render.render(anat, view, None, False, 64)
        assert np.array_equal(lung0, lung1)
        assert not les0.any()
        m = les1 > 0
        assert m.any()
        diff = img1[m].astype(float).mean() - img0[m].astype(float).mean()
        assert sign * diff > 8.0, (label, seed, diff)


def test_splits_patient_disjoint_and_fractions() -> None:
    ds = synthesize(200, ["No Finding", "Effusion"], size=32, seed=2)
    split_of: dict[str, set[str]] = {}
    for p, s in zip(ds.patient_ids, ds.splits, strict=True):
        split_of.setdefault(p, set()).add(s)
    assert len(split_of) == 200
    assert all(len(s) == 1 for s in split_of.values())
    counts = Counter(next(iter(s)) for s in split_of.values())
    for name, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2), strict=True):
        assert abs(counts[name] / 200 - frac) <= 0.02, counts
    ds2 = synthesize(40, ["No Finding", "Effusion"], size=32, seed=2, split_fractions=(0.5, 0.0, 0.5))
    assert set(ds2.splits) == {"train", "test"}
    per_patient = Counter(ds2.patient_ids).values()
    assert min(per_patient) >= 1 and max(per_patient) <= 3


def test_class_balance_and_label_independent_of_patient() -> None:
    classes = ["No Finding", "Pneumothorax", "Subcutaneous Emphysema"]
    ds = synthesize(50, classes, size=32, seed=7)
    counts = Counter(ds.labels)
    assert set(counts) == set(classes)
    assert max(counts.values()) - min(counts.values()) <= 1
    for split in ("train", "val", "test"):
        c = Counter(lab for lab, s in zip(ds.labels, ds.splits, strict=True) if s == split)
        assert max(c.values()) - min(c.values()) <= 1, (split, c)
    labels_of: dict[str, set[str]] = {}
    for p, lab in zip(ds.patient_ids, ds.labels, strict=True):
        labels_of.setdefault(p, set()).add(lab)
    assert any(len(v) > 1 for v in labels_of.values()), "labels should not follow the patient"


def test_shortcut_marker_rates() -> None:
    ds = synthesize(
        200, CLASS_NAMES, size=32, seed=9, shortcut={"trainval": 0.9, "test": 0.0}, images_per_patient=(2, 2)
    )
    assert len(ds) == 400
    labels = np.array(ds.labels)
    splits = np.array(ds.splits)
    for split, c in (("train", 0.9), ("val", 0.9), ("test", 0.0)):
        in_split = splits == split
        pos = in_split & (labels != "No Finding")
        neg = in_split & (labels == "No Finding")
        assert abs(ds.markers[pos].mean() - (1 + c) / 2) <= 0.05, split
        assert abs(ds.markers[neg].mean() - (1 - c) / 2) <= 0.08, split
    # the marker is drawn (bright block in the upper-left corner) exactly when flagged
    corner = ds.images[:, 2:4, 2:4].reshape(len(ds), -1).mean(axis=1)
    assert (corner[ds.markers] > 150).all()
    assert (corner[~ds.markers] < 60).all()


def test_generate_writes_consistent_files(tmp_path) -> None:
    kw = dict(size=64, seed=3, shortcut={"trainval": 1.0, "test": -1.0}, images_per_patient=(1, 2))
    out = tmp_path / "phantoms"
    csv_path = generate(out, 6, ["No Finding", "Pneumothorax"], **kw)
    assert csv_path == out / "labels.csv"
    ref = synthesize(6, ["No Finding", "Pneumothorax"], **kw)
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == (
            "image_id",
            "patient_id",
            "label",
            "split",
            "path",
            "lung_mask_path",
            "lesion_mask_path",
            "marker",
        )
        rows = list(reader)
    assert [r["image_id"] for r in rows] == ref.image_ids
    for i, row in enumerate(rows):
        assert row["patient_id"] == ref.patient_ids[i]
        assert row["label"] == ref.labels[i]
        assert row["split"] == ref.splits[i]
        assert row["marker"] == str(int(ref.markers[i]))
        assert row["path"] == f"images/{row['image_id']}.png"
        img = np.asarray(Image.open(out / row["path"]))
        lung = np.asarray(Image.open(out / row["lung_mask_path"]))
        les = np.asarray(Image.open(out / row["lesion_mask_path"]))
        assert np.array_equal(img, ref.images[i])
        assert np.array_equal(lung, ref.lung_masks[i] * 255)
        assert np.array_equal(les, ref.lesion_masks[i] * 255)
    assert not [p for p in out.iterdir() if p.name.startswith(".labels.")]  # no temp file left
    assert generate(out, 6, ["No Finding", "Pneumothorax"], **kw) == csv_path  # rerun in place


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(classes=["No Finding", "Cardiomegaly"]), "Cardiomegaly"),
        (dict(classes=["No Finding", "Effusion", "effusion"]), "effusion"),
        (dict(classes=["Effusion", "No Finding"]), "No Finding"),
        (dict(classes=["No Finding"]), "at least 2"),
        (dict(classes=["No Finding", "Effusion", "Effusion"]), "Effusion"),
        (dict(classes="No Finding"), "sequence"),
        (dict(shortcut={"train": 0.5, "test": 0.0}), "'train'"),
        (dict(shortcut={"trainval": 1.5, "test": 0.0}), "'trainval'"),
        (dict(shortcut={"trainval": 0.0, "test": -1.01}), "'test'"),
        (dict(shortcut={"trainval": 0.0, "test": float("nan")}), "'test'"),
        (dict(shortcut={"trainval": 0.0}), "'test'"),
        (dict(size=16), "size"),
        (dict(n_patients=0), "n_patients"),
        (dict(images_per_patient=(2, 1)), "images_per_patient"),
        (dict(split_fractions=(0.7, 0.2, 0.2)), "split_fractions"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, needle: str) -> None:
    args = dict(n_patients=2, classes=list(CLASS_NAMES), size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        synthesize(**args)


def test_unknown_class_message_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        synthesize(2, ["No Finding", "Nodule"], size=32)
    msg = str(info.value)
    assert "'Nodule'" in msg
    assert all(name in msg for name in CLASS_NAMES)


def test_montage_and_cli(tmp_path) -> None:
    out = montage(tmp_path / "m.png", size=64, seed=1, per_class=1)
    assert out.exists() and Image.open(out).size[0] > 100
    cli_out = tmp_path / "cli.png"
    assert phantom_cli(["--montage", str(cli_out), "--size", "48", "--per-class", "1"]) == 0
    assert cli_out.exists()
