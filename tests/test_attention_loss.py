import pytest
import torch

from trainer.attention_loss import attention_loss
from trainer.backbones import create_backbone
from trainer.cam import grad_cam
from trainer.metrics import cam_in_region
from trainer.priors import DEFAULT_PRIORS, RegionPrior, prior_table, region_masks
from trainer.tasks import TASKS


def _cam_and_region(b=4, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cam = torch.rand(b, 1, s, s, generator=g)
    region = torch.zeros(b, 1, s, s)
    region[:, :, s // 2 :, 4:28] = 1
    return cam, region


def test_paper_mode_is_the_hard_count():
    cam, region = _cam_and_region()
    labels = torch.tensor([1, 1, 1, 1])
    t = 0.6
    expected = 1 - (((cam > t) & (region > 0)).sum(dim=(1, 2, 3)) / region.sum(dim=(1, 2, 3))).mean()
    assert attention_loss(cam, region, labels, "paper", t) == pytest.approx(float(expected))


def test_soft_tends_to_paper_as_tau_goes_to_zero():
    cam, region = _cam_and_region()
    labels = torch.tensor([1, 0, 1, 1])
    paper = float(attention_loss(cam, region, labels, "paper", 0.5))
    gaps = [
        abs(float(attention_loss(cam, region, labels, "soft", 0.5, tau)) - paper) for tau in (0.1, 0.01, 1e-4)
    ]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3


def test_no_finding_rows_count_zero():
    cam, region = _cam_and_region()
    labels = torch.tensor([0, 0, 0, 0])
    for mode in ("paper", "soft", "energy"):
        assert float(attention_loss(cam, region, labels, mode, 0.5)) == 0.0
    one = float(attention_loss(cam[:1], region[:1], torch.tensor([1]), "energy", 0.5))
    mixed = float(attention_loss(cam[:2], region[:2], torch.tensor([1, 0]), "energy", 0.5))
    assert mixed == pytest.approx(one / 2)  # mean over all rows, the No Finding row adds 0


def test_energy_is_one_minus_mass_share():
    cam, region = _cam_and_region()
    labels = torch.ones(4, dtype=torch.long)
    share = cam_in_region(cam, region).mean()
    assert float(attention_loss(cam, region, labels, "energy", 0.5)) == pytest.approx(1 - float(share))


def test_invalid_arguments():
    cam, region = _cam_and_region()
    labels = torch.ones(4, dtype=torch.long)
    with pytest.raises(ValueError, match="threshold"):
        attention_loss(cam, region, labels, "soft", 1.2)
    with pytest.raises(ValueError, match="tau"):
        attention_loss(cam, region, labels, "soft", 0.5, tau=0)
    with pytest.raises(ValueError, match="valid: energy, input_grad, paper, soft"):
        attention_loss(cam, region, labels, "nope", 0.5)


def _grad_norm_of_attention(mode):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=2).train()
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([1, 1, 0, 1])
    _, cam = grad_cam(model, x, y, create_graph=mode != "paper")
    region = torch.zeros(4, 1, 64, 64)
    region[:, :, 32:] = 1
    loss = attention_loss(cam, region, y, mode, 0.5, tau=0.1)
    if not loss.requires_grad:
        return 0.0
    loss.backward()
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.grad is not None]
    return sum(float(p.grad.abs().sum()) for p in backbone)


@pytest.mark.parametrize("mode", ["soft", "energy"])
def test_differentiable_modes_reach_the_backbone(mode):
    assert _grad_norm_of_attention(mode) > 0


def test_paper_mode_carries_no_gradient():
    assert _grad_norm_of_attention("paper") == 0.0


@pytest.mark.parametrize("mode", ["soft", "energy"])
def test_a_few_steps_raise_in_region_share(mode):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=2).train()
    x = torch.randn(8, 3, 64, 64)
    y = torch.ones(8, dtype=torch.long)
    region = torch.zeros(8, 1, 64, 64)
    region[:, :, 32:, :] = 1  # lower half
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def share():
        model.eval()
        with torch.no_grad():
            _, cam = grad_cam(model, x, y)
        model.train()
        return float(cam_in_region(cam, region).mean())

    before = share()
    for _ in range(30):
        _, cam = grad_cam(model, x, y)
        loss = attention_loss(cam, region, y, mode, 0.5, tau=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = share()
    assert after > before + 0.1, f"in-region CAM share {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_region_masks_for_every_task(task):
    classes = TASKS[task]
    table = prior_table(classes, DEFAULT_PRIORS)
    s = 100
    boxes = torch.tensor([[20, 10, 60, 70]] * len(classes))  # x, y, w, h
    labels = torch.arange(len(classes))
    masks = region_masks(boxes, labels, table, (s, s))  # (C, 1, S, S)
    assert masks.shape == (len(classes), 1, s, s)
    assert masks[0].sum() == 0  # No Finding has no region
    for k, name in enumerate(classes[1:], start=1):
        m = masks[k, 0]
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert len(ys) > 0, name
        if name == "Effusion":  # lower half of the lung box
            assert (ys.min(), ys.max(), xs.min(), xs.max()) == (45, 79, 20, 79)
        elif name == "Pneumothorax":  # upper half
            assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 44, 20, 79)
        else:  # the authors' region: all but the lung box's columns from the box top down
            assert not m[10:, 20:80].any() and m[10:, :20].all() and m[10:, 80:].all()
            assert m[:10, :].all()  # the full-width rows above the lung box belong to it
            assert int(m.sum()) == s * s - 60 * (s - 10)


def test_prior_validation():
    with pytest.raises(ValueError, match="x0 < x1"):
        RegionPrior(x=(0.6, 0.2))
