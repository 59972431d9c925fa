import numpy as np
import pytest
import timm
import torch

from trainer.backbones import create_backbone
from trainer.cam import cam_in_region, grad_cam, pointing_hits


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
    ref = _oracle(model, x, target, layer(model))
    compared = 0
    for i in range(len(x)):
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
