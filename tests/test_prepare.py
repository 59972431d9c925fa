"""`cxr-sweep prepare`: NIH splits on the real metadata, folders, CSVs, bad input, resume."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sweeps.cli import app
from trainer.data.cache import open_cache
from trainer.data.prepare import build_cache, plan_splits
from trainer.data.sources import SourceError, csv_records, folder_records, nih_records
from trainer.data.splits import SplitError
from trainer.tasks import classes_for

runner = CliRunner()
NIH = Path(__file__).parent / "fixtures" / "nih"
ENTRY = NIH / "Data_Entry_2017_v2020.csv.gz"
BBOX = NIH / "BBox_List_2017.csv.gz"


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- NIH on the real metadata --------------------------------------------------------------------
@pytest.fixture(scope="module")
def nih_ne_dry(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nih") / "ne"
    result = _invoke(
        "prepare", "nih", "--csv", ENTRY, "--task", "ne", "--out", out, "--dry-run", "--seed", "0"
    )
    assert result.exit_code == 0, result.output
    return out


def test_nih_ne_uses_the_3955_effusion_only_rows_balanced_and_patient_disjoint(nih_ne_dry):
    rows = _manifest(nih_ne_dry / "manifest.csv")
    assert set(rows[0]) >= {"image_id", "patient_id", "label", "split", "source_path"}
    counts = Counter((r["split"], r["label"]) for r in rows)
    for cls in ("No Finding", "Effusion"):  # the paper's 2373/791/791 per class
        assert [counts[(s, cls)] for s in ("train", "val", "test")] == [2373, 791, 791]
    # every Effusion-only row of the file is used, and nothing else is
    with gzip.open(ENTRY, "rt", newline="") as f:
        effusion_only = {r["Image Index"] for r in csv.DictReader(f) if r["Finding Labels"] == "Effusion"}
    assert len(effusion_only) == 3955
    assert {r["image_id"] for r in rows if r["label"] == "Effusion"} == effusion_only
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # zero patient overlap
    quality = json.loads((nih_ne_dry / "data_quality.json").read_text())
    assert quality["patient_overlap"] == 0 and quality["skipped_rows"]["multi-label"] == 20796
    assert not (nih_ne_dry / "header.json").exists()  # a dry run is not a cache


def test_nih_same_seed_same_manifest_other_seed_differs(nih_ne_dry, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert (
        _invoke("prepare", "nih", "--csv", ENTRY, "--task", "ne", "--out", again, "--dry-run").exit_code == 0
    )
    args = ("prepare", "nih", "--csv", ENTRY, "--task", "ne", "--out", other, "--dry-run", "--seed", "1")
    assert _invoke(*args).exit_code == 0
    first = (nih_ne_dry / "manifest.csv").read_bytes()
    assert (again / "manifest.csv").read_bytes() == first
    assert (other / "manifest.csv").read_bytes() != first


def test_nih_nep_is_balanced_per_class_in_every_split():
    records, _ = nih_records(ENTRY, "nep")
    kept, _ = plan_splits(records, classes_for("nep"), seed=3)
    counts = Counter((r.split, r.label) for r in kept)
    for s in ("train", "val", "test"):
        assert len({counts[(s, c)] for c in classes_for("nep")}) == 1  # equal per class
    assert counts[("train", "Pneumothorax")] == 1316  # the rarer pathology decides (2194 · 0.6)


def test_nih_view_filter_and_official_split(tmp_path):
    records, skipped = nih_records(ENTRY, "np", view="PA")
    assert {r.view for r in records} == {"PA"} and skipped["view not PA"] > 0
    from trainer.data.sources import read_official_split

    test = {r.image_id for r in records if int(r.patient_id) % 5 == 0}  # patient-disjoint, like NIH's lists
    (tmp_path / "test_list.txt").write_text("\n".join(sorted(test)))
    (tmp_path / "train_val_list.txt").write_text(
        "\n".join(r.image_id for r in records if r.image_id not in test)
    )
    kept, _ = plan_splits(records, classes_for("np"), trainval_test=read_official_split(tmp_path))
    assert {r.image_id for r in kept if r.split == "test"} <= test
    assert not {r.image_id for r in kept if r.split != "test"} & test
    ids = [r.image_id for r in records]  # a list that splits patients is refused
    (tmp_path / "test_list.txt").write_text("\n".join(ids[::5]))
    (tmp_path / "train_val_list.txt").write_text("\n".join(i for k, i in enumerate(ids) if k % 5))
    with pytest.raises(SourceError, match="official split puts .* patient"):
        plan_splits(records, classes_for("np"), trainval_test=read_official_split(tmp_path))


def test_nih_has_no_subcutaneous_emphysema():
    with pytest.raises(SourceError, match="NIH ChestX-ray14 has no 'Subcutaneous Emphysema'"):
        nih_records(ENTRY, "ns")


def _nih_subset(tmp_path: Path, n_per_class: int = 12) -> tuple[Path, Path, list[dict[str, str]]]:
    """A small NIH-format CSV (real rows: effusions with boxes first) and synthetic images for them."""
    with gzip.open(BBOX, "rt", newline="") as f:
        boxed = {r[0] for r in csv.reader(f) if len(r) > 1 and r[1] == "Effusion"}
    with gzip.open(ENTRY, "rt", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    eff = sorted(
        (r for r in rows if r["Finding Labels"] == "Effusion"), key=lambda r: r["Image Index"] not in boxed
    )
    nf = [r for r in rows if r["Finding Labels"] == "No Finding"]
    chosen = eff[: n_per_class * 2] + nf[: n_per_class * 3]
    sub = tmp_path / "Data_Entry_subset.csv"
    with open(sub, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(chosen)
    images = tmp_path / "nih_images"
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(1024), np.arange(1024)) // 8  # (1024, 1024): NIH's image size
    for i, r in enumerate(chosen):  # NIH's layout: images_00k/images/<id>.png
        folder = images / f"images_{i % 3 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        arr = ((ramp + int(rng.integers(0, 255))) % 256).astype(np.uint8)
        if i % 7 == 1:  # RGBA exports occur in the real set
            Image.fromarray(np.stack([arr] * 3 + [np.full_like(arr, 255)], -1)).save(
                folder / r["Image Index"]
            )
        elif i % 7 == 2:  # 16-bit grey
            Image.fromarray(arr.astype(np.uint16) * 16).save(folder / r["Image Index"])
        else:
            Image.fromarray(arr).save(folder / r["Image Index"])
    return sub, images, chosen


def test_nih_prepare_builds_a_cache_with_boxes_and_quality_report(tmp_path, quick_segmenter):
    sub, images, chosen = _nih_subset(tmp_path)
    out = tmp_path / "cache"
    result = _invoke(
        "prepare",
        "nih",
        "--csv",
        sub,
        "--images",
        images,
        "--task",
        "ne",
        "--out",
        out,
        "--bbox",
        BBOX,
        "--segmenter",
        quick_segmenter,
        "--size",
        "64",
        "--seed",
        "0",
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    cache = open_cache(out, classes=classes_for("ne"))
    assert cache.header["data_access"] == "public" and cache.header["segmenter"].startswith(
        "unet:resnet18@64px"
    )
    assert cache.images.shape[1:] == (64, 64)
    quality = json.loads((out / "data_quality.json").read_text())
    assert quality["patient_overlap"] == 0 and quality["images"] == len(cache.manifest)
    assert quality["lung_box_fallbacks"] == cache.header["lung_box_fallbacks"]
    with gzip.open(BBOX, "rt", newline="") as f:
        boxes = {r[0]: r for r in csv.reader(f) if len(r) > 1 and r[1] == "Effusion"}
    kept_with_box = [i for i, r in enumerate(cache.manifest) if r["image_id"] in boxes]
    assert kept_with_box, "the subset keeps effusions that have NIH boxes"
    assert cache.lesion_known.sum() == len(kept_with_box)
    i = kept_with_box[0]
    x, y, w, h = (float(v) * 64 / 1024 for v in boxes[cache.manifest[i]["image_id"]][2:6])  # cache px
    ys, xs = np.nonzero(cache.lesion_masks[i])
    assert (xs.min(), ys.min()) == (int(np.floor(x)), int(np.floor(y)))
    assert (xs.max() + 1, ys.max() + 1) == (min(64, int(np.ceil(x + w))), min(64, int(np.ceil(y + h))))
    assert not (out.parent / ".cache.prepare").exists()  # the work folder is gone
    assert all(not Path(r["source_path"]).is_absolute() for r in cache.manifest)


def test_nih_missing_image_is_named_and_no_cache_is_left(tmp_path, quick_segmenter):
    sub, images, chosen = _nih_subset(tmp_path, 6)
    victim = next(images.rglob(chosen[0]["Image Index"]))
    victim.unlink()
    out = tmp_path / "cache"
    result = _invoke(
        "prepare",
        "nih",
        "--csv",
        sub,
        "--images",
        images,
        "--task",
        "ne",
        "--out",
        out,
        "--segmenter",
        quick_segmenter,
        "--size",
        "64",
    )
    assert result.exit_code == 2
    assert f"Data_Entry_subset.csv:2: image {chosen[0]['Image Index']!r} not found" in result.output
    assert not out.exists()


# ---- resume and atomicity ---------------------------------------------------------------------
def test_interrupted_prepare_leaves_no_cache_and_resumes_from_finished_chunks(tmp_path, quick_segmenter):
    from trainer.segmenter import load_segmenter

    sub, images, _ = _nih_subset(tmp_path, 8)
    records, skipped = nih_records(sub, "ne", images_dir=images)
    kept, dropped = plan_splits(records, classes_for("ne"), seed=0)
    corrupt = images / kept[-1].path
    good = corrupt.read_bytes()
    corrupt.write_bytes(good[: len(good) // 3])  # a truncated PNG in the last chunk
    seg = load_segmenter(quick_segmenter, device="cpu")
    out = tmp_path / "cache"
    kw = dict(root=images, classes=classes_for("ne"), task="ne", size=64, source="nih", data_access="public")
    with pytest.raises(SourceError, match=rf"{kept[-1].where}: .*cannot decode image"):
        build_cache(kept, out, segmenter=seg, chunk=8, **kw)
    assert not out.exists()  # no cache a trial would accept
    work = tmp_path / ".cache.prepare"
    finished = sorted(p.name for p in work.glob("chunk_*.npz"))
    assert len(finished) == (len(kept) - 1) // 8
    corrupt.write_bytes(good)
    result = build_cache(kept, out, segmenter=seg, chunk=8, **kw)
    assert result.resumed_chunks == len(finished)
    assert len(open_cache(out).manifest) == len(kept)


# ---- class folders and CSVs ---------------------------------------------------------------------
def _tree(root: Path, layout: dict[str, int]) -> None:
    """``layout``: folder (``split/class`` or ``class``) → image count; two images per patient."""
    rng = np.random.default_rng(1)
    k = 0
    for key, n in layout.items():
        folder = root / key
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (48, 48), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"P{k // 2:04d}_{folder.name}_{i}.png")
            k += 1


def test_folder_tree_with_splits_and_patient_regex(tmp_path, quick_segmenter):
    root = tmp_path / "ottawa"
    layout = {
        f"{s}/{c}": n
        for s, n in (("train", 6), ("val", 2), ("test", 2))
        for c in ("no_finding", "Effusion", "pneumothorax", "subcutaneous_emphysema")
    }
    _tree(root, layout)
    out = tmp_path / "cache"
    result = _invoke(
        "prepare",
        "folders",
        "--root",
        root,
        "--task",
        "neps",
        "--out",
        out,
        "--segmenter",
        quick_segmenter,
        "--size",
        "48",
        "--patient-regex",
        r"^(P\d+)_",
    )
    assert result.exit_code == 0, result.output
    cache = open_cache(out, classes=classes_for("neps"))
    assert cache.header["data_access"] == "private"
    assert Counter(r["split"] for r in cache.manifest) == {"train": 24, "val": 8, "test": 8}
    # ne from the same tree: other classes skipped, counted
    records, skipped = folder_records(root, "ne", patient_regex=r"^(P\d+)_")
    assert {r.label for r in records} == {"No Finding", "Effusion"}
    assert sum(skipped.values()) == 2 * (6 + 2 + 2)  # pneumothorax and emphysema images, counted


def test_folder_tree_without_splits_gets_patient_disjoint_splits(tmp_path):
    root = tmp_path / "flat"
    _tree(root, {"normal": 20, "effusion": 20})
    records, _ = folder_records(root, "ne", patient_regex=r"^(P\d+)_")
    kept, _ = plan_splits(records, classes_for("ne"))
    assert Counter(r.split for r in kept) == {"train": 24, "val": 8, "test": 8}


def test_patient_overlap_in_a_given_split_is_refused(tmp_path):
    root = tmp_path / "overlap"
    for split in ("train", "val", "test"):
        for cls in ("No Finding", "Effusion"):
            d = root / split / cls
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / f"P001_{split}_{cls[0]}.png")
    records, _ = folder_records(root, "ne", patient_regex=r"^(P\d+)_")
    with pytest.raises(SplitError, match=r"1 patient\(s\) appear in more than one split, e.g. P001"):
        plan_splits(records, classes_for("ne"))


def _csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.slow
def test_phantom_csv_with_the_trained_segmenter_is_the_demo_path(phantom_dir, lung_segmenter, tmp_path):
    out = tmp_path / "cache"
    result = _invoke(
        "prepare",
        "csv",
        "--csv",
        phantom_dir / "labels.csv",
        "--task",
        "ne",
        "--out",
        out,
        "--segmenter",
        lung_segmenter,
        "--size",
        "64",
        "--data-access",
        "synthetic",
    )
    assert result.exit_code == 0, result.output
    quality = json.loads((out / "data_quality.json").read_text())
    assert quality["segmenter_dice_vs_given_masks"]["mean"] >= 0.9  # the U-Net reproduces the exact masks
    assert quality["lung_box_fallbacks"] == 0
    cache = open_cache(out, classes=classes_for("ne"))
    assert cache.header["data_access"] == "synthetic" and cache.lesion_known.all()
    assert "marker" in cache.manifest[0]  # extra CSV columns travel to the manifest


BAD_CSV_CASES = {
    "missing columns": (
        [{"path": "a.png", "label": "Effusion"}],
        "missing required column(s) ['patient_id']",
    ),
    "unknown label": (
        [{"path": "a.png", "label": "Efusion", "patient_id": "1"}],
        "labels.csv:2: unknown label 'Efusion'",
    ),
    "escaping path": (
        [{"path": "../secret.png", "label": "Effusion", "patient_id": "1"}],
        "labels.csv:2: path '../secret.png' escapes the data root",
    ),
    "empty class": (
        [{"path": "a.png", "label": "Effusion", "patient_id": "1"}],
        "no images of class(es) ['No Finding']",
    ),
    "duplicate ids": (
        [
            {"path": "a.png", "label": "Effusion", "patient_id": "1"},
            {"path": "sub/a.png", "label": "No Finding", "patient_id": "2"},
        ],
        "duplicate image id 'a': labels.csv:2 and labels.csv:3",
    ),
    "bad split": (
        [{"path": "a.png", "label": "Effusion", "patient_id": "1", "split": "holdout"}],
        "split 'holdout' is not one of",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV_CASES))
def test_bad_csv_input_names_the_row(case, tmp_path):
    rows, message = BAD_CSV_CASES[case]
    path = _csv(tmp_path / "labels.csv", rows, sorted({k for r in rows for k in r}, key=list(rows[0]).index))
    with pytest.raises(SourceError) as err:
        csv_records(path, "ne")
    assert message in str(err.value)
    result = _invoke("prepare", "csv", "--csv", path, "--task", "ne", "--out", tmp_path / "c", "--dry-run")
    assert result.exit_code == 2 and message.split(":")[0] in result.output
    assert not (tmp_path / "c").exists()


def test_corrupt_png_is_named(tmp_path, quick_segmenter):
    rows = []
    for i in range(12):
        Image.fromarray(np.full((16, 16), i * 10, np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"path": f"img{i}.png", "label": ["No Finding", "Effusion"][i % 2], "patient_id": str(i)})
    (tmp_path / "img5.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    path = _csv(tmp_path / "labels.csv", rows)
    result = _invoke(
        "prepare",
        "csv",
        "--csv",
        path,
        "--task",
        "ne",
        "--out",
        tmp_path / "c",
        "--segmenter",
        quick_segmenter,
        "--size",
        "16",
    )
    assert (
        result.exit_code == 2
        and "labels.csv:7: " in result.output
        and "img5.png: cannot decode image" in result.output
    )
    assert not (tmp_path / "c").exists()


def test_segmenter_mismatch_and_missing_segmenter(tmp_path, quick_segmenter, phantom_dir):
    base = ("prepare", "csv", "--csv", phantom_dir / "labels.csv", "--task", "ne", "--out", tmp_path / "c")
    result = _invoke(*base, "--segmenter", quick_segmenter, "--segmenter-size", "256")
    assert result.exit_code == 2 and "trained at input size 64 px, but 256 px was asked for" in result.output
    result = _invoke(*base, "--segmenter", quick_segmenter, "--segmenter-encoder", "resnet34")
    assert result.exit_code == 2 and "encoder is 'resnet18', but 'resnet34'" in result.output
    result = _invoke(
        "prepare", "folders", "--root", tmp_path / "nowhere", "--task", "ne", "--out", tmp_path / "d"
    )
    assert result.exit_code == 2 and "not a directory" in result.output
    flat = tmp_path / "flat"  # no lung masks in the source and no segmenter
    _tree(flat, {"normal": 10, "effusion": 10})
    result = _invoke("prepare", "folders", "--root", flat, "--task", "ne", "--out", tmp_path / "e")
    assert result.exit_code == 2 and "pass a segmenter checkpoint (--segmenter)" in result.output


def test_existing_cache_is_not_overwritten_without_flag(tmp_path, ne_cache):
    result = _invoke("prepare", "nih", "--csv", ENTRY, "--task", "ne", "--out", ne_cache, "--dry-run")
    assert result.exit_code == 2 and "already exists (pass --overwrite" in result.output
    assert (ne_cache / "header.json").exists()
