"""What a decision reads outside the lungs (trainer/outside.py) and the guidance that acts on it:
the outside_evidence score, the lung-only fills, the outside_mask augmentation and mode input_grad."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainer.attention_loss import input_gradient_term
from trainer.outside import FILLS, OutsideScores, fill_outside, lung_region, outside_augment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


class _Linear(nn.Module):
    """logit(finding) = Σ W·x over the first channel, logit(No Finding) = 0: reads where W is nonzero."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (x[:, 0] * self.w).sum(dim=(1, 2))  # (B,)
        return torch.stack([torch.zeros_like(v), v], dim=1)


class _ReadsWindow(nn.Module):
    """P(finding) from the mean intensity of one window, or of the pixels where ``mask`` is 1."""

    def __init__(self, ys: slice = slice(None), xs: slice = slice(None), mask: torch.Tensor | None = None):
        super().__init__()
        self.ys, self.xs, self.mask = ys, xs, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            v = (x[:, 0] * self.mask[:, 0]).sum(dim=(1, 2)) / self.mask.sum(dim=(1, 2, 3)).clamp_min(1)
        else:
            v = x[:, 0, self.ys, self.xs].mean(dim=(1, 2))  # (B,)
        return torch.stack([torch.zeros_like(v), 20.0 * (v + 0.6)], dim=1)  # (B, 2)


def _region(size: int = 16) -> torch.Tensor:
    region = torch.zeros(1, 1, size, size)
    region[..., 4:12, 4:12] = 1.0
    return region


def test_input_grad_is_zero_for_a_model_that_reads_only_the_region():
    region = _region().expand(4, -1, -1, -1)
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * region[0, 0]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, loss = input_gradient_term(_Linear(weight), x, torch.tensor([1, 0, 1, 0]), region)
    assert loss.item() == 0.0


def test_input_grad_penalises_reading_outside_and_a_step_lowers_it():
    region = _region().expand(4, -1, -1, -1)
    model = _Linear(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))  # reads everywhere
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 0, 1, 0])  # No Finding rows count too: the decision for them may not read outside
    logits, loss = input_gradient_term(model, x, y, region)
    assert 0.5 < loss.item() < 1.0  # 3/4 of the pixels lie outside: about that share of the energy
    assert logits.requires_grad and loss.requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = loss.item()
    for _ in range(3):
        opt.zero_grad()
        input_gradient_term(model, x, y, region)[1].backward()  # a double backward, through ∂log p/∂x
        opt.step()
    after = input_gradient_term(model, x, y, region)[1].item()
    assert after < before
    with torch.no_grad():  # evaluation: the same value, no graph
        _, value = input_gradient_term(model, x, y, region)
    assert not value.requires_grad and value.item() == pytest.approx(after)


def test_input_grad_counts_no_row_without_a_region():
    model = _Linear(torch.ones(16, 16))
    x = torch.randn(2, 3, 16, 16)
    _, loss = input_gradient_term(model, x, torch.tensor([1, 1]), torch.zeros(2, 1, 16, 16))
    assert loss.item() == 0.0


@pytest.mark.parametrize("fill", FILLS)
def test_a_fill_keeps_the_lungs_exactly_and_replaces_the_rest(fill):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    x[:, :, :4, :4] = 5.0  # a bright marker in the corner, outside the region
    keep = _region(32).expand(3, -1, -1, -1).contiguous()
    out = fill_outside(x, keep, fill, torch.Generator().manual_seed(7))
    inside = keep.expand_as(x) > 0
    assert torch.equal(out[inside], x[inside])
    assert (out[:, :, :4, :4] < 4.0).all()  # the marker is gone under every fill
    if fill == "mean":
        assert torch.allclose(out[:, :, 0, 0], x.mean(dim=(1, 2, 3))[:, None])
    if fill == "noise":  # seeded: an evaluation pass is repeatable
        again = fill_outside(x, keep, fill, torch.Generator().manual_seed(7))
        assert torch.equal(out, again)
        assert out[~inside].std() > 0.5


def test_lung_region_dilates_by_pixels_at_224_scaled():
    lung = torch.zeros(1, 1, 112, 112)
    lung[..., 50:60, 50:60] = 1
    assert lung_region(lung, 0).sum() == 100
    assert lung_region(lung, 8).sum() == (10 + 2 * 4) ** 2  # 8 px at 224 → 4 px at 112


def test_outside_augment_replaces_the_share_it_is_given():
    torch.manual_seed(0)
    x = torch.randn(200, 3, 16, 16)
    lung = _region().expand(200, -1, -1, -1)
    assert outside_augment(x, lung, 0.0, "mean", 0) is x
    out = outside_augment(x, lung, 0.5, "mean", 0)
    changed = (out != x).flatten(1).any(dim=1)
    assert 70 < int(changed.sum()) < 130
    inside = lung.expand_as(x) > 0
    assert torch.equal(out[inside], x[inside])
    assert (outside_augment(x, lung, 1.0, "noise", 0) != x).flatten(1).any(dim=1).all()


def _scores(model, x, lung, labels, fill="mean", dilate_px=8):
    with torch.no_grad():
        p_full = model(x).softmax(1)
        lungs_only = fill_outside(x, lung_region(lung, dilate_px), fill, torch.Generator().manual_seed(0))
        p_in = model(lungs_only).softmax(1)
    scores = OutsideScores()
    scores.update(p_full, p_in, labels)
    return scores.compute(2)


@pytest.fixture(scope="module")
def marker_val(tmp_path_factory):
    """Validation images of shortcut phantoms (the marker on most findings), normalised, with lung masks."""
    from trainer.data.cache import open_cache
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.data.transforms import MEAN, STD

    root = tmp_path_factory.mktemp("outside")
    generate(root / "ph", n_patients=24, classes=("No Finding", "Effusion"), size=64, seed=3,
             shortcut={"trainval": 0.9, "test": 0.0})  # fmt: skip
    cache = open_cache(cache_from_phantoms(root / "ph", root / "cache", "ne"), verify=False)
    idx = cache.split_indices("val")
    images = torch.from_numpy(np.asarray(cache.images[idx])).float().div(255.0)[:, None]
    x = ((images - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()
    lung = torch.from_numpy(np.asarray(cache.lung_masks[idx])).float()[:, None]
    return x, lung, torch.from_numpy(np.asarray(cache.labels[idx])).long(), root / "cache"


@pytest.mark.parametrize("fill", FILLS)
def test_outside_evidence_is_zero_for_a_lung_reader_and_large_for_a_marker_reader(marker_val, fill):
    import shortcut

    x, lung, labels, _ = marker_val
    lungs = _scores(_ReadsWindow(mask=lung), x, lung, labels, fill)
    assert lungs["outside_evidence"] == 0.0  # the lung pixels are kept exactly: nothing changes
    assert lungs["outside_dependence"] == 0.0
    ys, xs = shortcut._marker_slices(64)
    marker = _scores(_ReadsWindow(ys, xs), x, lung, labels, fill)
    # a blur keeps a compact marker's coarse brightness: it removes less of the shortcut than mean or noise
    assert marker["outside_evidence"] > (0.08 if fill == "blur" else 0.3)
    assert marker["outside_dependence"] >= marker["outside_evidence"]
    assert 0.0 <= marker["inside_only_accuracy"] <= 1.0 and 0.0 <= marker["inside_only_f1_macro"] <= 1.0


def test_outside_evidence_agrees_with_the_marker_effect_in_direction(marker_val):
    """On phantoms, where the shortcut is known: the model that reads the marker scores higher on both."""
    import shortcut

    x, lung, labels, cache = marker_val
    ys, xs = shortcut._marker_slices(64)
    # a lung reader that ignores the marker, with a fixed mask: the marker intervention cannot touch it
    reader = _ReadsWindow(slice(30, 50), slice(10, 30))
    models = {"marker": _ReadsWindow(ys, xs), "lungs": reader}
    evidence = {k: _scores(m, x, lung, labels)["outside_evidence"] for k, m in models.items()}
    effect = {k: shortcut.marker_effect(m, cache) for k, m in models.items()}
    assert evidence["marker"] > evidence["lungs"] and effect["marker"] > effect["lungs"]


@pytest.mark.parametrize(
    "sets",
    [
        ["attention.mode=input_grad", "attention.input_region=lung"],
        ["attention.mode=input_grad", "attention.input_region=prior", "outside.fill=noise"],
        ["attention.lambda=1", "outside.augment=0.5", "outside.subset=8", "outside.fill=blur"],
        ["attention.mode=energy", "attention.layer=previous", "attention.cam_score=log_softmax"],
    ],
    ids=["input_grad-lung", "input_grad-prior", "outside_mask", "energy-previous-layer"],
)
def test_the_new_guidance_trains_through_the_cli_and_logs_the_outside_scores(sets, ne_cache, tmp_path):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from sweeps.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--config", str(ROOT / "configs/trial.yaml"), "--epochs", "2"]
    for s in [f"data.cache={ne_cache}", "model.backbone=test_resnet", "train.batch_size=32", *sets]:
        args += ["--set", s]
    args += ["--output-dir", str(tmp_path / "run"), "--tracking-uri", uri, "--experiment", "outside"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outside").experiment_id])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for name in ("outside_evidence", "outside_dependence", "inside_only_accuracy", "inside_only_f1_macro"):
        assert f"test_{name}" in m and f"best_val_{name}" in m, name
        assert len(client.get_metric_history(run.info.run_id, f"val_{name}")) == 2
    assert -1.0 <= m["test_outside_evidence"] <= 1.0
    if "attention.mode=input_grad" in sets:
        assert 0.0 < m["train_attention_loss"] <= 1.0 and 0.0 < m["val_attention_loss"] <= 1.0
        assert run.data.params["attention.input_region"] == sets[1].split("=")[1]
        assert "attention.cam_target" not in run.data.params  # input_grad steers no CAM
    elif "attention.layer=previous" in sets:
        assert run.data.params["attention.layer"] == "previous" and 0.0 < m["train_attention_loss"] < 1.0
    else:
        assert run.data.params["outside.augment"] == "0.5"


def test_outside_evidence_is_a_selection_metric_and_a_sweep_objective():
    from trainer.config import TrialConfig
    from trainer.metrics import higher_is_better

    assert higher_is_better("val_outside_evidence") is False
    assert higher_is_better("val_inside_only_f1_macro") is True
    cfg = TrialConfig.from_dict(
        {"data": {"cache": "x"}, "train": {"selection_metric": "val_inside_only_f1_macro"}}
    )
    assert cfg.train.selection_metric == "val_inside_only_f1_macro"


def test_outside_dependence_does_not_cancel_where_the_shortcut_is_independent_of_the_label():
    """A marker on one finding and one No Finding image: erasing it lowers P(true) on the first and
    raises it on the second. The signed score cancels to 0; the dependence does not."""
    p_full = torch.tensor([[0.1, 0.9], [0.2, 0.8]])  # the marker says "finding" on both
    p_in = torch.tensor([[0.5, 0.5], [0.6, 0.4]])  # without it the model is unsure
    scores = OutsideScores()
    scores.update(p_full, p_in, torch.tensor([1, 0]))
    out = scores.compute(2)
    assert out["outside_evidence"] == pytest.approx(0.0, abs=1e-7)
    assert out["outside_dependence"] == pytest.approx(0.4)
