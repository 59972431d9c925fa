"""Backbones: a registry over timm with the feature/head split Grad-CAM needs.

``create_backbone(name, num_classes, pretrained_file=None)`` builds any timm model with
``pretrained=False`` (no downloads at run time); a local weight file loads through timm's
``pretrained_cfg_overlay=dict(file=...)``. The paper's backbones are registered by name;
any other timm model name works too. Grad-CAM uses ``forward_features`` (the last feature
map) and ``forward_head`` (pooling + classifier), see :mod:`trainer.cam`.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ._registry import Registry, UnknownNameError
from .errors import UserError

__all__ = [
    "BACKBONES",
    "BackboneError",
    "check_backbone_name",
    "check_input_size",
    "create_backbone",
    "features_to_nchw",
]

BACKBONES: Registry[nn.Module] = Registry("backbone")


class BackboneError(UserError):
    """A backbone cannot be built or cannot take the requested input."""


def _timm_builder(timm_name: str):
    def build(num_classes: int, pretrained_file: Path | None = None, **kw) -> nn.Module:
        return _create_timm(timm_name, num_classes, pretrained_file, **kw)

    build.__doc__ = f"timm `{timm_name}`"
    return build


# The paper's backbones, and small ones for laptops and tests.
for _name in ("pvt_v2_b2_li", "vgg16", "resnet50", "resnet18", "test_resnet", "test_vit", "test_convnext"):
    BACKBONES.register(_name)(_timm_builder(_name))


def check_backbone_name(name: str) -> None:
    """Raise :class:`UnknownNameError` unless ``name`` is registered or a timm model."""
    if name in BACKBONES or timm.is_model(name):
        return
    raise UnknownNameError(
        f"unknown backbone {name!r}; registered: {', '.join(BACKBONES.names())} "
        "(or any name from timm.list_models())"
    )


def create_backbone(
    name: str, num_classes: int, pretrained_file: str | Path | None = None, **kwargs
) -> nn.Module:
    """Build backbone ``name`` with a ``num_classes`` head, optionally from a local weight file."""
    check_backbone_name(name)
    if name in BACKBONES:
        return BACKBONES.create(name, num_classes=num_classes, pretrained_file=pretrained_file, **kwargs)
    return _create_timm(name, num_classes, pretrained_file, **kwargs)


def _create_timm(name: str, num_classes: int, pretrained_file: str | Path | None, **kwargs) -> nn.Module:
    if pretrained_file is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    path = Path(pretrained_file)
    if not path.is_file():
        raise BackboneError(f"model.pretrained_file: {path} does not exist")
    try:
        # timm drops the classifier automatically when num_classes differs from the file's head.
        return timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(path)),
            **kwargs,
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise BackboneError(f"model.pretrained_file: {path} does not fit backbone {name!r}: {e}") from e


def features_to_nchw(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """View a ``forward_features`` output as ``(B, C, h, w)``.

    CNNs and PVT give NCHW already; Swin-like models give NHWC; ViTs give tokens ``(B, N, C)``
    with ``num_prefix_tokens`` class/register tokens first and a square patch grid after.
    """
    c = getattr(model, "num_features", None)
    if feats.ndim == 4:
        if feats.shape[1] == c or feats.shape[-1] != c:
            return feats
        return feats.permute(0, 3, 1, 2)  # NHWC → NCHW
    if feats.ndim == 3:
        tokens = feats[:, getattr(model, "num_prefix_tokens", 0) :]  # (B, N, C)
        n = tokens.shape[1]
        side = round(n**0.5)
        if side * side != n:
            raise BackboneError(f"cannot arrange {n} patch tokens into a square grid for Grad-CAM")
        return tokens.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], side, side)
    raise BackboneError(f"unsupported feature shape {tuple(feats.shape)} for Grad-CAM")


def check_input_size(model: nn.Module, size: int, name: str = "model") -> tuple[int, int]:
    """Run one image of ``size``×``size`` through the model; return the feature-map size.

    Raises :class:`BackboneError` naming ``model.image_size`` if the backbone cannot take it.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            feats = model.forward_features(x)
            model.forward_head(feats)
            fmap = features_to_nchw(model, feats)
    except Exception as e:  # timm raises assorted errors for sizes a model cannot take
        raise BackboneError(
            f"model.image_size: backbone {name!r} cannot take {size}x{size} input: {e}"
        ) from e
    finally:
        model.train(was_training)
    return int(fmap.shape[-2]), int(fmap.shape[-1])
