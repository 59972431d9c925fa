"""The shortcut benchmark (benchmarks/shortcut.py): its marker intervention, its selection rules
and that docs/results.md shows the committed run's figures."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


class _ReadsPixels(nn.Module):
    """P(finding) from the mean intensity of one image window: a model with a known shortcut."""

    def __init__(self, ys: slice, xs: slice) -> None:
        super().__init__()
        self.ys, self.xs = ys, xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, self.ys, self.xs].mean(dim=(1, 2))  # (B,)
        return torch.stack([torch.zeros_like(v), 20.0 * (v + 0.6)], dim=1)  # (B, 2); background is -1


@pytest.fixture(scope="module")
def shortcut_cache(tmp_path_factory):
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms

    root = tmp_path_factory.mktemp("sc")
    generate(root / "ph", n_patients=24, classes=("No Finding", "Effusion"), size=64, seed=3,
             shortcut={"trainval": 0.9, "test": 0.0})  # fmt: skip
    return cache_from_phantoms(root / "ph", root / "cache", "ne")


def test_marker_effect_is_large_for_a_marker_reader_and_zero_for_a_lung_reader(shortcut_cache):
    import shortcut

    ys, xs = shortcut._marker_slices(64)
    assert shortcut.marker_effect(_ReadsPixels(ys, xs), shortcut_cache) > 0.5
    # the intervention changes the marker block only: a model reading the lungs sees no difference
    assert shortcut.marker_effect(_ReadsPixels(slice(30, 50), slice(10, 30)), shortcut_cache) == 0.0


@pytest.mark.parametrize("size", [64, 128, 224])
def test_marker_block_slices_cover_the_drawn_marker(size):
    """With and without the marker, a phantom differs inside the slices; just outside them it
    differs no more than far away (where only the re-drawn photon noise differs)."""
    import numpy as np
    import shortcut

    from trainer.data.phantom import example

    with_m, *_ = example("Effusion", seed=5, size=size, marker=True)
    without, *_ = example("Effusion", seed=5, size=size, marker=False)
    diff = np.abs(with_m.astype(float) - without.astype(float))
    ys, xs = shortcut._marker_slices(size)
    inside = np.zeros_like(diff, dtype=bool)
    inside[ys, xs] = True
    ring = np.zeros_like(inside)
    ring[: ys.stop + 3, : xs.stop + 3] = True
    ring &= ~inside
    far = np.zeros_like(inside)
    far[size // 4 :, :] = True
    noise = diff[far].mean()
    assert diff[inside].mean() > 20 * noise  # the marker is there
    assert diff[ring].mean() < 2 * noise + 0.5  # and nothing of it outside the slices


@pytest.mark.slow
def test_shortcut_smoke_selects_on_validation_and_writes_everything(tmp_path):
    import shortcut

    out, md, png = tmp_path / "sc.json", tmp_path / "sc.md", tmp_path / "cams.png"
    argv = ["--smoke", "--out", str(out), "--markdown", str(md), "--montage", str(png)]
    argv += ["--work", str(tmp_path / "w")]
    assert shortcut.main(argv) == 0
    r = json.loads(out.read_text())
    sc, clean = r["tasks"]
    assert (sc["condition"], clean["condition"]) == ("shortcut", "clean")
    for res in (sc, clean):
        assert list(res["methods"]) == [
            "ce",
            "paper",
            "soft",
            "energy",
            "energy-lsm",
        ]  # the default --methods
        for m in res["methods"]:
            seeds = [row["seed"] for row in res["methods"][m]["per_seed"]]
            assert seeds == [0, 1], (res["condition"], m, seeds)
            assert res["methods"][m]["summary"]["f1_macro"]["n"] == 2
    assert sc["methods"]["ce"]["config"] == {"lambda": 1.0}
    assert sc["methods"]["paper"]["config"]["lambda"] in (0.75, 0.5, 0.25, "adaptive")
    for mode in ("soft", "energy"):
        tried = sc["search"][mode]
        assert len(tried) == 2
        best = max(tried, key=lambda t: t["val_f1_macro"])
        if sum(t["val_f1_macro"] == best["val_f1_macro"] for t in tried) == 1:  # ties: trial order
            assert sc["methods"][mode]["config"] == best["config"]
        # the control reuses the configuration validation chose with the shortcut
        assert clean["methods"][mode]["config"] == sc["methods"][mode]["config"]
    g = sc["goals"]
    f1 = {m: sc["methods"][m]["summary"]["f1_macro"]["mean"] for m in sc["methods"]}
    assert g["soft_minus_ce_f1"] == pytest.approx(f1["soft"] - f1["ce"])
    text = md.read_text()
    assert "no shortcut (control)" in text and "cxr-sweep report of sc-ne-grid" in text
    assert png.stat().st_size > 10_000
    # the outside scores of every seed's model, again, on validation and test: the test split's
    # signed score is the one the trials logged
    import outside_rank

    rank = tmp_path / "rank.json"
    assert outside_rank.main(["--result", str(out), "--work", str(tmp_path / "w"), "--out", str(rank)]) == 0
    rows = json.loads(rank.read_text())["rows"]
    assert set(rows) == set(sc["methods"])
    for m, row in rows.items():
        logged = sc["methods"][m]["summary"]["outside_evidence"]["mean"]
        assert row["test_outside_evidence"] == pytest.approx(logged, abs=1e-4), m
        assert row["test_outside_dependence"] >= abs(row["test_outside_evidence"]) - 1e-9


@pytest.mark.parametrize("run", ["shortcut_cpu", "shortcut_decision_cpu", "shortcut_prev_cpu"])
def test_docs_results_show_the_committed_benchmark_tables(run):
    """docs/results.md carries the tables of the committed runs verbatim (no hand-edited figures)."""
    import shortcut

    result = json.loads((ROOT / f"benchmarks/results/{run}.json").read_text())
    docs = (ROOT / "docs/results.md").read_text()
    for line in shortcut.markdown(result).splitlines():
        if line.startswith(("| ", "Δ", "Spearman")):
            assert line in docs, line
