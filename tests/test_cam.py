import numpy as np
import pytest
import timm
import torch

from trainer.backbones import create_backbone
from trainer.cam import cam_from_parts, grad_cam, has_head_shortcut
from trainer.metrics import cam_in_region, pointing_hits


def _oracle(model, x, target, layer):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])  # (B, H, W)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("resnet18", lambda m: m.layer4),
        ("pvt_v2_b0", lambda m: m.stages[-1]),
        ("vgg11", lambda m: m.features),
    ],
)
def test_matches_pytorch_grad_cam(name, layer):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    x = torch.randn(4, 3, 96, 96)
    target = torch.tensor([0, 1, 2, 1])
    _, ours = grad_cam(model, x, target)
    _assert_correlates(ours, _oracle(model, x, target, layer(model)), name)


def _assert_correlates(ours, ref, name: str) -> None:
    """Our CAMs ``(B, 1, H, W)`` against pytorch-grad-cam's ``(B, H, W)``: r ≥ 0.99 on at least two images."""
    compared = 0
    for i in range(len(ref)):
        a, b = ours[i, 0].detach().numpy().ravel(), ref[i].ravel()
        if a.std() == 0 or b.std() == 0:  # ReLU removed everything: both must agree on that
            assert a.max() == pytest.approx(0, abs=1e-6) and b.max() == pytest.approx(0, abs=1e-6)
            continue
        r = np.corrcoef(a, b)[0, 1]
        assert r >= 0.99, f"{name} image {i}: correlation {r:.4f}"
        compared += 1
    assert compared >= 2


def test_shapes_range_and_one_forward_pass():
    model = create_backbone("resnet18", num_classes=2).train()
    x = torch.randn(3, 3, 64, 64)
    calls = {"n": 0}
    hook = model.conv1.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    logits, cam = grad_cam(model, x, "predicted")
    hook.remove()
    assert calls["n"] == 1, "the CAM must come from the training step's own forward pass"
    assert logits.shape == (3, 2) and cam.shape == (3, 1, 64, 64)
    assert float(cam.detach().min()) >= 0.0 and float(cam.detach().max()) <= 1.0 + 1e-6
    assert torch.allclose(cam.amax(dim=(2, 3)), torch.ones(3, 1), atol=1e-3)  # per-image scaled
    assert cam.requires_grad  # differentiable w.r.t. the parameters in train mode


def test_eval_under_no_grad_gives_plain_tensors():
    model = create_backbone("test_resnet", num_classes=2).eval()
    with torch.no_grad():
        logits, cam = grad_cam(model, torch.randn(2, 3, 64, 64), torch.tensor([1, 0]))
    assert not logits.requires_grad and not cam.requires_grad
    assert cam.shape == (2, 1, 64, 64)


@pytest.mark.parametrize("name", ["test_vit", "swin_tiny_patch4_window7_224"])
def test_token_and_nhwc_backbones(name):
    size = 224 if "swin" in name else 64
    model = timm.create_model(name, pretrained=False, num_classes=2)
    logits, cam = grad_cam(model, torch.randn(1, 3, size, size), "predicted")
    assert cam.shape == (1, 1, size, size) and logits.shape == (1, 2)


def test_localization_scores():
    cam = torch.zeros(2, 1, 8, 8)
    cam[0, 0, 1, 1] = 1.0  # peak inside
    cam[1, 0, 6, 6] = 1.0  # peak outside
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :4] = 1
    assert pointing_hits(cam, mask).tolist() == [True, False]
    assert pointing_hits(cam, mask, tolerance=3).tolist() == [True, True]  # (6, 6) is 3 px from the mask
    assert pointing_hits(cam, mask, tolerance=2).tolist() == [True, False]
    assert cam_in_region(cam, mask).tolist() == [1.0, 0.0]


def _tiny_vgg(drop_rate=0.3, padding=0):
    """timm's VGG class at a size a test can afford: same ConvMlp head (7×7 fc1, ReLU, 1×1 fc2)."""
    from timm.models.vgg import VGG

    torch.manual_seed(0)
    cfg = [8, "M", 16, "M", 16, "M", 32, "M", 32, "M"]
    m = VGG(cfg, num_classes=3, mlp_ratio=1 / 32, drop_rate=drop_rate)
    m.pre_logits.fc1.padding = (padding, padding)
    return m.train()


def _step_grads(model, x, y, region, mode, cam_weights):
    """CAM, logits and every parameter's gradient of λ·CE + (1−λ)·L_att, dropout seeded alike."""
    from trainer.attention_loss import attention_loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    logits, cam = grad_cam(model, x, y, create_graph=mode != "paper", cam_weights=cam_weights)
    loss = 0.5 * torch.nn.functional.cross_entropy(logits, y) + 0.5 * attention_loss(
        cam, region, y, mode, 0.5, tau=0.1
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), cam.detach(), grads


@pytest.mark.parametrize("size", [64, 224, 256])  # resized up to 7×7 by the head; exactly 7×7; 8×8
@pytest.mark.parametrize("mode", ["soft", "energy", "paper"])
def test_vgg_head_shortcut_matches_the_double_backward(size, mode):
    """The kernel-sum channel weights give the reference's CAM and the same parameter gradients."""
    model = _tiny_vgg()
    assert has_head_shortcut(model)  # the shortcut is what "auto" runs here
    x = torch.randn(4, 3, size, size)
    y = torch.tensor([0, 1, 2, 1])
    region = torch.zeros(4, 1, size, size)
    region[:, :, size // 2 :] = 1
    fast = _step_grads(model, x, y, region, mode, "auto")
    ref = _step_grads(model, x, y, region, mode, "autograd")
    torch.testing.assert_close(fast[0], ref[0])
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-4)
    head = ("pre_logits.fc1.weight", "pre_logits.fc2.weight", "head.fc.weight")
    if mode != "paper":  # the CAM's weights depend on the head: those gradients must be there
        assert all(float((fast[2][n] - ref[2][n]).abs().max()) < float(ref[2][n].abs().max()) for n in head)
    for name, g in ref[2].items():
        scale = float(g.abs().max()) + 1e-12
        err = float((fast[2][name] - g).abs().max())
        assert err <= 1e-4 * scale, f"{name}: max |Δgrad| {err:.3g} vs max |grad| {scale:.3g}"


def test_vgg_head_shortcut_under_no_grad_matches():
    model = _tiny_vgg(drop_rate=0.0).eval()
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([1, 2])
    with torch.no_grad():
        fast = grad_cam(model, x, y)
        ref = grad_cam(model, x, y, cam_weights="autograd")
    assert not fast[1].requires_grad
    torch.testing.assert_close(fast[0], ref[0])
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-4)


def test_padded_head_falls_back_to_the_reference():
    model = _tiny_vgg(padding=1)  # a padded fc1 breaks the kernel-sum identity
    assert not has_head_shortcut(model)
    with pytest.raises(ValueError, match="cam_weights must be"):
        grad_cam(model, torch.randn(1, 3, 64, 64), cam_weights="fast")


@pytest.mark.parametrize("target", ["label", "predicted"])
def test_log_softmax_score_weights_are_the_log_softmax_gradient(target):
    """score="log_softmax": channel weights = spatial mean of d log p_c / d features (autograd)."""
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    x = torch.randn(3, 3, 64, 64)
    y = torch.tensor([2, 0, 1])
    with torch.no_grad():
        logits, cam = grad_cam(model, x, y if target == "label" else "predicted", score="log_softmax")
    cls = y if target == "label" else logits.argmax(1)
    feats = model.forward_features(x).detach().requires_grad_(True)
    lp = torch.log_softmax(model.forward_head(feats), 1).gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(lp, feats)
    ref = torch.relu((g.mean(dim=(2, 3), keepdim=True) * feats).sum(1, keepdim=True)).detach()
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    lo, hi = ref.amin(dim=(2, 3), keepdim=True), ref.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(cam, (ref - lo) / (hi - lo + 1e-7), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="score must be one of"):
        grad_cam(model, x, y, score="softmax")


def test_log_softmax_score_sees_evidence_routed_through_the_other_class():
    """A head that says "finding" only by lowering "No Finding": the logit CAM of the finding is
    empty, the log-softmax CAM shows where the evidence is."""
    from torch import nn

    class Routed(nn.Module):
        def forward_features(self, x):
            return x[:, :1]  # (B, 1, H, W): one feature channel = the image

        def forward_head(self, f):
            s = f.mean(dim=(2, 3))  # (B, 1)
            return torch.cat([-5.0 * s, torch.zeros_like(s)], dim=1)  # (B, 2): No Finding, finding

    x = torch.zeros(1, 3, 16, 16)
    x[:, :, 2:5, 2:5] = 1.0  # the evidence (a marker) in one corner
    y = torch.tensor([1])
    with torch.no_grad():
        _, cam_logit = grad_cam(Routed(), x, y, score="logit")
        _, cam_lsm = grad_cam(Routed(), x, y, score="log_softmax")
    assert float(cam_logit.max()) == 0.0  # d(finding logit)/d features = 0: nothing to see
    assert float(cam_lsm[0, 0, 2:5, 2:5].mean()) > 0.9 and float(cam_lsm[0, 0, 10:, 10:].max()) < 0.1


@pytest.mark.parametrize("mode", ["soft", "energy"])
def test_vgg_head_shortcut_matches_the_reference_for_the_log_softmax_score(mode):
    model = _tiny_vgg(drop_rate=0.0)
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2])
    outs = {}
    for way in ("auto", "autograd"):
        model.zero_grad(set_to_none=True)
        logits, cam = grad_cam(model, x, y, cam_weights=way, score="log_softmax")
        cam.sum().backward()
        outs[way] = cam.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(outs["auto"][0], outs["autograd"][0], atol=1e-5, rtol=1e-4)
    for name, g in outs["autograd"][1].items():
        assert float((outs["auto"][1][name] - g).abs().max()) <= 1e-4 * (float(g.abs().max()) + 1e-12), name


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("resnet18", lambda m: m.layer3),
        ("pvt_v2_b0", lambda m: m.stages[2]),
        ("vgg11", lambda m: m.features[19]),
    ],
)
def test_the_previous_layer_matches_pytorch_grad_cam_there(name, layer):
    """``layer="previous"``: the stage before the last, at twice its resolution, as pytorch-grad-cam
    computes Grad-CAM at that module."""
    from trainer.cam import previous_stage

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    assert previous_stage(model) is layer(model)
    x = torch.randn(4, 3, 96, 96)
    target = torch.tensor([0, 1, 2, 1])
    _, ours = grad_cam(model, x, target, layer="previous")
    _assert_correlates(ours, _oracle(model, x, target, layer(model)), name)


def test_the_previous_layer_is_differentiable_in_training_and_plain_in_evaluation():
    from trainer.cam import grad_cam_parts, grad_cams

    torch.manual_seed(0)
    model = create_backbone("resnet18", num_classes=2).train()
    x = torch.randn(2, 3, 64, 64)
    logits, fmap, weights = grad_cam_parts(model, x, torch.tensor([1, 0]), layer="previous")
    assert fmap.shape[-2:] == (4, 4)  # layer3 at 64 px: twice the 2 × 2 of layer4
    assert weights.requires_grad and fmap.requires_grad
    probe = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1))
    # layer4's shortcut convolution: timm zero-initialises each block's last BatchNorm, so the
    # residual branches pass nothing yet
    conv = model.layer4[0].downsample[0].weight
    (g,) = torch.autograd.grad((weights * probe).sum(), conv, allow_unused=True)
    assert g is not None and g.abs().sum() > 0  # the weights are trained through the last stage
    with torch.no_grad():
        plain, cams = grad_cams(model.eval(), x, [torch.tensor([1, 0])], layer="previous")
    assert not plain.requires_grad and not cams[0].requires_grad and cams[0].shape == (2, 1, 64, 64)


def test_the_previous_layer_trains_a_transformer_through_plain_attention():
    """A differentiable mode at ``layer="previous"`` on PVT differentiates the last stage twice:
    PyTorch's fused attention kernels have no second derivative (``derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``), so that stage
    runs timm's plain attention for the step, and is fused again after it."""
    from trainer.cam import grad_cam_parts, previous_stage

    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=2).train()
    fused = [m for m in model.stages[3].modules() if getattr(m, "fused_attn", None) is not None]
    assert fused and all(m.fused_attn for m in fused)  # timm's default here
    earlier = [m for m in previous_stage(model).modules() if getattr(m, "fused_attn", None) is not None]
    seen = {}

    def record(where):
        def hook(module, _args):
            seen.setdefault(where, module.fused_attn)

        return hook

    for where, m in (("earlier", earlier[0]), ("last", fused[0])):
        m.register_forward_pre_hook(record(where))
    x = torch.randn(2, 3, 64, 64)
    logits, fmap, weights = grad_cam_parts(model, x, torch.tensor([1, 0]), layer="previous")
    assert seen == {"earlier": True, "last": False}  # only the stage after the CAM's runs plain
    cam = cam_from_parts(fmap, weights, (64, 64))
    (cam.mean() + logits.sum()).backward()  # the second derivative through stages.3's attention
    grads = [p.grad for p in model.stages[3].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(m.fused_attn for m in fused)  # fused again after the step
