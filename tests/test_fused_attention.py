"""``train.compile_attention``: the attention term from Grad-CAM's parts, eager and compiled."""

import copy

import pytest
import torch

import trainer.attention_loss as al
from trainer.attention_loss import attention_loss, attention_term, fused_attention_term, select_attention_term
from trainer.backbones import create_backbone
from trainer.cam import grad_cam, grad_cam_parts
from trainer.config import AttentionConfig, TrialConfig
from trainer.epoch import training_step
from trainer.priors import DEFAULT_PRIORS, prior_table, region_masks

CLASSES = ("No Finding", "Effusion", "Pneumothorax")
MODES = ("paper", "soft", "energy")


def _batch(size: int = 64, b: int = 6):
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=len(CLASSES)).train()
    x = torch.randn(b, 3, size, size)
    y = torch.arange(b) % len(CLASSES)  # No Finding rows included: they must count 0
    box = torch.tensor([[size // 8, size // 10, 3 * size // 4, 4 * size // 5]] * b)
    return model, x, y, box, prior_table(CLASSES, DEFAULT_PRIORS)


@pytest.mark.parametrize("mode", MODES)
def test_attention_term_equals_cam_region_and_loss_in_turn(mode):
    model, x, y, box, table = _batch()
    _, cam = grad_cam(model, x, y, create_graph=True)
    ref = attention_loss(cam, region_masks(box, y, table, x.shape[-2:]), y, mode, 0.4, 0.05)
    _, fmap, weights = grad_cam_parts(model, x, y, create_graph=True)
    got = attention_term(fmap, weights, box, y, table, tuple(x.shape[-2:]), mode, 0.4, 0.05)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    assert 0.0 < ref.item() < 1.0  # a real value, not a degenerate 0 or 1
    if mode != "paper":  # and the same gradient w.r.t. every parameter
        g_ref = torch.autograd.grad(ref, list(model.parameters()), retain_graph=True, allow_unused=True)
        g_got = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
        for a, b in zip(g_ref, g_got, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_term_and_fused_step_match_eager():
    """Compiled on the CPU here (inductor); the GPU timing is in docs/performance.md."""
    model, x, y, box, table = _batch()
    size = tuple(x.shape[-2:])
    for mode in ("soft", "paper"):
        _, fmap, weights = grad_cam_parts(model, x, y, create_graph=True)
        ref = attention_term(fmap, weights, box, y, table, size, mode, 0.4, 0.05)
        got = fused_attention_term(fmap, weights, box, y, table, size, mode, 0.4, 0.05)
        assert al._Fused.failed is None
        assert got.item() == pytest.approx(ref.item(), abs=1e-5)
        if mode == "soft":
            g_ref = torch.autograd.grad(ref, [fmap, weights], retain_graph=True)
            g_got = torch.autograd.grad(got, [fmap, weights])
            for a, b in zip(g_ref, g_got, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # the whole training step: same losses, same parameters after one SGD step
    att = AttentionConfig(**{"lambda": 0.5, "mode": "soft", "cam_target": "label", "threshold": 0.4})
    twins = [model, copy.deepcopy(model)]
    out = []
    for fused, m in zip((False, True), twins, strict=True):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        term = select_attention_term(fused)
        out.append(training_step(m, x, y, box, opt, scaler, att, 0.5, table, None, term=term))
    for a, b in zip(out[0][:3], out[1][:3], strict=True):
        assert b.item() == pytest.approx(a.item(), abs=1e-5)
    for (name, a), b in zip(twins[0].named_parameters(), twins[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def _fresh(monkeypatch, fn):
    monkeypatch.setattr(al._Fused, "fn", fn)
    monkeypatch.setattr(al._Fused, "checked", set())
    monkeypatch.setattr(al._Fused, "failed", None)


def _args(mode="soft", threshold=0.4):
    model, x, y, box, table = _batch()
    _, fmap, weights = grad_cam_parts(model, x, y, create_graph=True)
    return (fmap, weights, box, y, table, tuple(x.shape[-2:]), mode, threshold, 0.05)


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Cannot find a working triton installation")

    _fresh(monkeypatch, broken)
    args = _args()
    with pytest.warns(RuntimeWarning, match="compile_attention.*triton"):
        got = fused_attention_term(*args)
    assert got.item() == pytest.approx(attention_term(*args).item(), abs=1e-7)
    assert got.requires_grad  # the eager term still trains the model
    assert "triton" in al._Fused.failed
    with pytest.raises(ValueError, match="threshold"):  # an error eager raises too still surfaces
        fused_attention_term(*args[:-2], 1.5, 0.05)


class _BackwardFails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("inductor: backward compilation failed")


def test_a_backward_that_fails_to_compile_is_caught_before_the_step_needs_it(monkeypatch):
    """torch.compile builds the backward at the first backward(): the check runs it up front."""
    _fresh(monkeypatch, lambda *a, **k: _BackwardFails.apply(attention_term(*a, **k)))
    args = _args()
    with pytest.warns(RuntimeWarning, match="backward compilation failed"):
        got = fused_attention_term(*args)
    torch.autograd.grad(got, [args[0]])  # the returned term is eager: its backward works
    assert al._Fused.failed is not None


def test_bad_inputs_are_not_taken_for_a_compile_failure(monkeypatch):
    _fresh(monkeypatch, attention_term)  # "compiles" fine: the error is the inputs'
    with pytest.raises(ValueError, match="threshold"):
        fused_attention_term(*_args(threshold=1.5))
    assert al._Fused.failed is None
    args = _args()
    assert fused_attention_term(*args).item() == pytest.approx(attention_term(*args).item())
    assert len(al._Fused.checked) == 1  # checked once for this signature


def test_compile_attention_is_an_off_by_default_train_option():
    cfg = TrialConfig.from_dict({"data": {"cache": "/nowhere"}})
    assert cfg.train.compile_attention is False
    on = TrialConfig.from_dict({"data": {"cache": "/nowhere"}, "train": {"compile_attention": True}})
    assert on.train.compile_attention is True
