"""Region priors from one annotated X-ray (`cxr-sweep prior`) and priors files in trial configs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from sweeps.cli import app
from trainer.config import TrialConfig
from trainer.data.cache import open_cache
from trainer.priors import (
    DEFAULT_PRIORS,
    Box,
    RegionPrior,
    load_priors,
    prior_from_boxes,
    prior_table,
    region_masks,
)

runner = CliRunner()


def test_prior_from_boxes_relative_to_the_lung_box():
    lung = (20, 10, 100, 80)  # x, y, w, h
    p = prior_from_boxes(lung, (90, 60, 20, 30), both_sides=False)  # lower right
    assert p == RegionPrior(boxes=[Box(x=(0.7, 0.9), y=(0.625, 1.0))])
    assert p == RegionPrior(x=(0.7, 0.9), y=(0.625, 1.0), columns="inside")  # the older form loads the same
    mirrored = prior_from_boxes(lung, (90, 60, 20, 30))  # and the same band on the other lung: a union
    assert [b.x for b in mirrored.boxes] == [(0.1, 0.3), (0.7, 0.9)] and not mirrored.complement
    table = prior_table(["No Finding", "Effusion"], {"Effusion": mirrored})
    m = region_masks(torch.tensor([[20, 10, 100, 80]]), torch.tensor([1]), table, (100, 140))[0, 0]
    assert m[60:90, 30:50].all() and m[60:90, 90:110].all() and int(m.sum()) == 2 * 30 * 20
    assert not m[:, 50:90].any()  # the columns between the two bands (the mediastinum) stay out
    central = prior_from_boxes(lung, (50, 60, 30, 30))  # a band that overlaps its mirror: one band
    assert [b.x for b in central.boxes] == [(0.3, 0.7)]
    beside = prior_from_boxes(lung, (2, 40, 10, 50))  # wholly left of the lung columns
    assert [b.x for b in beside.boxes] == [(-math.inf, 0.0), (1.0, math.inf)]
    assert {b.y for b in beside.boxes} == {(0.375, 1.0)} and not beside.complement
    with pytest.raises(ValueError, match="positive width and height"):
        prior_from_boxes(lung, (1, 1, 0, 5))


def test_priors_file_round_trip_merge_and_errors(tmp_path):
    from trainer.priors import save_prior

    f = tmp_path / "priors.yaml"
    save_prior(f, "Effusion", RegionPrior(x=(0.1, 0.9), y=(0.6, 1.0)), {"image": "a.png"})
    save_prior(f, "Subcutaneous Emphysema", RegionPrior(y=(0.2, math.inf), columns="outside"), {"image": "b"})
    got = load_priors(f)
    assert got["Effusion"].boxes[0].y == (0.6, 1.0)
    assert got["Subcutaneous Emphysema"] == RegionPrior(y=(0.2, math.inf), columns="outside")  # ±inf survive
    assert yaml.safe_load(f.read_text())["priors"]["Effusion"]["source"] == {"image": "a.png"}
    (tmp_path / "bad.yaml").write_text("priors: [1, 2]")
    with pytest.raises(ValueError, match="expected a mapping of class name to prior"):
        load_priors(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("Effusion: {x: [0.5, 0.2]}")
    with pytest.raises(ValueError, match="prior 'Effusion'.*x0 < x1"):
        load_priors(tmp_path / "bad2.yaml")
    with pytest.raises(ValueError, match="not found"):
        load_priors(tmp_path / "none.yaml")


def test_trial_config_takes_a_priors_file_relative_to_itself(tmp_path, ne_cache):
    from trainer.priors import save_prior

    (tmp_path / "cfg").mkdir()
    save_prior(tmp_path / "cfg" / "priors.yaml", "Effusion", RegionPrior(x=(0.2, 0.8), y=(0.55, 1.0)), {})
    (tmp_path / "cfg" / "trial.yaml").write_text(
        f"data: {{cache: {ne_cache}, task: ne}}\nattention: {{lambda: 0.5, priors: priors.yaml}}\n"
    )
    cfg = TrialConfig.from_file(tmp_path / "cfg" / "trial.yaml")
    assert cfg.attention.priors["Effusion"].boxes[0].y == (0.55, 1.0)
    assert cfg.attention.priors["Pneumothorax"] == DEFAULT_PRIORS["Pneumothorax"]  # defaults fill the rest
    again = TrialConfig.from_dict(cfg.to_dict())  # the resolved config carries values, not the path
    assert again.attention.priors["Effusion"] == cfg.attention.priors["Effusion"]


def _effusion_example(phantom_dir: Path) -> dict[str, str]:
    with open(phantom_dir / "labels.csv", newline="") as f:
        return next(r for r in csv.DictReader(f) if r["label"] == "Effusion" and r["split"] == "train")


def _box(mask_png: Path) -> str:
    ys, xs = np.nonzero(np.asarray(Image.open(mask_png)))
    return f"{xs.min()},{ys.min()},{xs.max() - xs.min() + 1},{ys.max() - ys.min() + 1}"


def _coverage(cache_dir: Path, prior: RegionPrior) -> float:
    """Share of all effusion lesion pixels in the cache that fall inside ``prior``'s regions."""
    cache = open_cache(cache_dir)
    idx = np.nonzero(cache.labels == 1)[0]
    table = prior_table(cache.classes, {"Effusion": prior})
    regions = region_masks(
        torch.from_numpy(np.asarray(cache.lung_boxes[idx])).long(),
        torch.ones(len(idx), dtype=torch.long),
        table,
        (cache.size, cache.size),
    )[:, 0].numpy()
    lesions = np.asarray(cache.lesion_masks[idx]) > 0
    return float((regions.astype(bool) & lesions).sum() / lesions.sum())


def test_prior_cli_from_one_annotated_phantom_covers_the_other_patients_lesions(
    phantom_dir, ne_cache, tmp_path
):
    row = _effusion_example(phantom_dir)
    out = tmp_path / "priors.yaml"
    result = runner.invoke(
        app,
        [
            "prior",
            "--image",
            str(phantom_dir / row["path"]),
            "--box",
            _box(phantom_dir / row["lesion_mask_path"]),
            "--label",
            "effusion",
            "--lung-mask",
            str(phantom_dir / row["lung_mask_path"]),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    derived = load_priors(out)["Effusion"]
    assert (
        not derived.complement and min(b.y[0] for b in derived.boxes) > 0.3
    )  # the lower lung, as the paper's
    cov_derived, cov_paper = _coverage(ne_cache, derived), _coverage(ne_cache, DEFAULT_PRIORS["Effusion"])
    print(f"effusion lesion pixels covered: derived {cov_derived:.3f}, paper's lower half {cov_paper:.3f}")
    assert cov_derived >= 0.5


@pytest.mark.slow
def test_prior_cli_with_the_segmenter(phantom_dir, lung_segmenter, tmp_path):
    row = _effusion_example(phantom_dir)
    out = tmp_path / "priors.yaml"
    args = [
        "prior",
        "--image",
        str(phantom_dir / row["path"]),
        "--box",
        _box(phantom_dir / row["lesion_mask_path"]),
        "--label",
        "Effusion",
        "--segmenter",
        str(lung_segmenter),
        "--out",
        str(out),
    ]
    assert runner.invoke(app, args).exit_code == 0
    gt = tmp_path / "gt.yaml"
    args_gt = [*args[:-4], "--lung-mask", str(phantom_dir / row["lung_mask_path"]), "--out", str(gt)]
    assert runner.invoke(app, args_gt).exit_code == 0
    a, b = load_priors(out)["Effusion"], load_priors(gt)["Effusion"]
    assert len(a.boxes) == len(b.boxes)  # segmenter ≈ exact mask, box by box
    for p, q in zip(a.boxes, b.boxes, strict=True):
        assert np.allclose(p.y, q.y, atol=0.1) and np.allclose(p.x, q.x, atol=0.1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "1,2,3"], "expected x,y,w,h"),
        (["--box", "60,60,30,30"], "is not inside the 64x64 image"),
        (["--label", "No Finding"], "not a pathology"),
        (["--label", "Efusion"], "not a pathology"),
        (["--columns", "sideways"], "--columns must be auto, inside or outside"),
        (["--segmenter", "x.pt"], "pass exactly one of --segmenter and --lung-mask"),
    ],
)
def test_prior_cli_bad_input(phantom_dir, tmp_path, extra, message):
    row = _effusion_example(phantom_dir)
    base = {
        "--image": str(phantom_dir / row["path"]),
        "--box": "10,10,5,5",
        "--label": "effusion",
        "--lung-mask": str(phantom_dir / row["lung_mask_path"]),
        "--out": str(tmp_path / "p.yaml"),
    }
    for k, v in zip(extra[::2], extra[1::2], strict=True):
        base[k] = v
    result = runner.invoke(app, ["prior", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "p.yaml").exists()
