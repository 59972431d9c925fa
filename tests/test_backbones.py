import pytest
import timm
import torch
from safetensors.torch import save_file

from trainer.backbones import (
    BACKBONES,
    BackboneError,
    check_input_size,
    create_backbone,
    features_to_nchw,
)
from trainer.cam import grad_cam

PAPER_BACKBONES = ("pvt_v2_b2_li", "vgg16", "resnet50")


def test_registry_has_the_paper_backbones_and_rejects_unknown_names():
    for name in PAPER_BACKBONES:
        assert name in BACKBONES
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5000'; registered: .*resnet50"):
        create_backbone("resnet5000", num_classes=2)


def test_any_timm_model_builds_without_downloads():
    m = create_backbone("convnext_atto", num_classes=3)
    assert m.num_classes == 3


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_local_weight_file_loads(tmp_path, fmt):
    torch.manual_seed(1)
    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    state = src.state_dict()
    f = tmp_path / f"resnet18.{fmt}"
    if fmt == "pth":
        torch.save(state, f)
    else:
        save_file(state, str(f))
    torch.manual_seed(2)  # a different init: only the file can make the weights equal
    m = create_backbone("resnet18", num_classes=2, pretrained_file=f)
    assert torch.equal(m.conv1.weight, state["conv1.weight"])
    assert torch.equal(m.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert m.fc.out_features == 2  # the 1000-class head is replaced for the task


def test_weight_file_errors_name_the_file(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("resnet18", num_classes=2, pretrained_file=tmp_path / "missing.pth")
    wrong = tmp_path / "vgg.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), wrong)
    with pytest.raises(BackboneError, match=r"vgg.pth does not fit backbone 'resnet18'"):
        create_backbone("resnet18", num_classes=2, pretrained_file=wrong)


def test_input_size_a_backbone_cannot_take():
    vit = create_backbone("test_vit", num_classes=2)  # 16 px patches
    with pytest.raises(BackboneError, match=r"model.image_size: backbone 'test_vit' cannot take 50x50"):
        check_input_size(vit, 50, "test_vit")
    assert check_input_size(create_backbone("test_resnet", num_classes=2), 64) == (2, 2)


def test_features_to_nchw_layouts():
    m = create_backbone("test_resnet", num_classes=2)
    f = torch.randn(2, m.num_features, 3, 3)
    assert features_to_nchw(m, f) is f
    assert features_to_nchw(m, f.permute(0, 2, 3, 1)).shape == f.shape


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_BACKBONES)
def test_paper_backbones_at_224(name):
    m = create_backbone(name, num_classes=3).train()
    x = torch.randn(2, 3, 224, 224)
    logits, cam = grad_cam(m, x, "predicted")
    assert logits.shape == (2, 3) and cam.shape == (2, 1, 224, 224)
    assert check_input_size(m, 224, name) == (7, 7)
