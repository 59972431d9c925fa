"""Batched, differentiable Grad-CAM from the one forward pass of a training step.

``logits, cam = grad_cam(model, images, target)`` runs ``forward_features`` once, the head
once, and takes the CAM's channel weights (spatial mean of d(score)/d(features)) through the
head only — never a second forward pass or a model copy. When gradients are enabled the CAM
is differentiable w.r.t. the model's parameters (``create_graph``), so an attention loss on
it trains the backbone *and* the head weights the channel weights come from. Under
``torch.no_grad()`` (validation) the features carry no graph and only the head's graph is
built for the CAM.

Why two ways to get the channel weights: the generic one, ``autograd.grad(score, features,
create_graph=True)``, makes the final backward differentiate the whole head a second time.
That is free for pool-then-linear heads (ResNet, PVT, ConvNeXt, ViT) but not for VGG, whose
head starts with a 7×7 convolution 512 → 4096 (103 M weights, 411 MB): its double backward
adds a second full-size weight gradient, weight reorders and a 411 MB accumulation, and made
the attention step 1.7× the CE step on CPU. Only the *spatial sum* of d(score)/d(features)
is needed, and through a convolution without padding (after VGG's average-pool resize) that
sum is ``Σ_o g_o · Σ_hw W[o, c, h, w]``: the gradient at the conv's output contracted with
the kernel summed over its taps. So for that head the weights come from autograd through the
pooling + classifier only, then by hand through ReLU → the 1×1 ``fc2`` as a matrix → dropout →
ReLU, and the 4096 × 512 kernel sum, with the same value and parameter gradients as the
generic path (tested; the head is piecewise linear, so its ReLU masks carry no derivative).
``cam_weights="autograd"`` forces the generic path.

``layer="previous"`` takes the CAM one stage earlier, at twice the resolution (timm's
``feature_info``: the last stage whose reduction is half the last one's; ResNet ``layer3``, PVT
``stages.2``, VGG the ReLU before its last pool). The activation is caught by a forward hook in
the same forward pass and the channel weights are the gradient through the last stage and the
head: a second-order graph through that stage when training (dearer than the head-only one of the
last layer), a first-order one from that stage on in evaluation. PyTorch's fused attention kernels
(``scaled_dot_product_attention``: flash, memory-efficient) have no second derivative, so for that
forward the attention blocks after the stage (PVT's last stage) take timm's plain path
(``fused_attn = False``: the same attention in matmuls and a softmax).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vgg import ConvMlp
from torch import nn

from .backbones import features_to_nchw

__all__ = [
    "LAYERS",
    "SCORES",
    "cam_from_parts",
    "check_cam_support",
    "grad_cam",
    "grad_cam_parts",
    "grad_cams",
    "has_head_shortcut",
    "previous_stage",
]

# Min-max scaling divides by the CAM's range plus this share of its maximum: a CAM whose values
# are all tiny (range 1e-8) still spans [0, 1], and a flat one is 0 (no fixed epsilon that
# squashes small-valued CAMs: with 1e-7, a CAM of range 1e-8 peaked at 0.09).
_REL_EPS = 1e-6
SCORES = ("logit", "log_softmax")  # what Grad-CAM differentiates (``grad_cam(score=...)``)
LAYERS = ("last", "previous")  # where the CAM is taken (``grad_cam(layer=...)``)


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor | Literal["predicted"] = "predicted",
    *,
    create_graph: bool | None = None,
    cam_weights: Literal["auto", "autograd"] = "auto",
    score: Literal["logit", "log_softmax"] = "logit",
    layer: Literal["last", "previous"] = "last",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, K)`` and Grad-CAM ``(B, 1, H, W)`` in [0, 1] for the whole batch in one pass.

    ``target``: a ``(B,)`` class tensor, or ``"predicted"`` for each image's arg-max class.
    CAM = ReLU(Σ_c mean_hw(∂score/∂A_c) · A_c) at the last feature map, bilinearly upsampled
    to the input size and min-max scaled per image. ``cam_weights="auto"`` takes the head's
    shortcut for the channel weights where one exists (see the module docstring);
    ``"autograd"`` always differentiates the whole head (the reference).
    ``score``: what is differentiated — the target class's ``"logit"`` (Grad-CAM as published,
    the paper's choice) or its ``"log_softmax"``, whose gradient is the logit's minus the
    probability-weighted gradients of the other classes: evidence a model routes into *another*
    class's logit (e.g. "marker → less No Finding") then shows in the target's CAM instead of
    hiding from it (class-contrastive Grad-CAM; see docs/results.md).
    """
    outer_grad = torch.is_grad_enabled()
    logits, fmap, weights = grad_cam_parts(
        model, images, target, create_graph=create_graph, cam_weights=cam_weights, score=score, layer=layer
    )
    with torch.set_grad_enabled(outer_grad):
        cam = cam_from_parts(fmap, weights, images.shape[-2:])
        if not outer_grad:
            logits, cam = logits.detach(), cam.detach()
    return logits, cam


def grad_cam_parts(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor | Literal["predicted"] = "predicted",
    *,
    create_graph: bool | None = None,
    cam_weights: Literal["auto", "autograd"] = "auto",
    score: Literal["logit", "log_softmax"] = "logit",
    layer: Literal["last", "previous"] = "last",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`grad_cam` up to the CAM: logits ``(B, K)``, feature map ``(B, C, h, w)`` and channel
    weights ``(B, C)``; :func:`cam_from_parts` turns the last two into the CAM.

    The split lets a caller hand the whole elementwise tail (CAM, region, loss) to one
    ``torch.compile``'d function (:func:`trainer.attention_loss.attention_term`) while the
    head's double backward stays eager.
    """
    if cam_weights not in ("auto", "autograd"):
        raise ValueError(f"cam_weights must be 'auto' or 'autograd', got {cam_weights!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad if create_graph is None else create_graph and outer_grad
    if layer != "last":
        return _previous_stage_parts(model, images, [target], create_graph, score, layer)[0]
    mlp = _conv_mlp_head(model) if cam_weights == "auto" else None
    # The head's weights as the shortcut uses them, taken *before* the forward pass on purpose:
    # autograd then runs their backward last, after the layers' own weight gradients, and adds
    # into those buffers in place (no second 411 MB / 67 MB gradient buffer, no copy).
    head_w = _conv_mlp_weight_views(mlp) if mlp is not None else None
    feats = model.forward_features(images)  # (B, C, h, w) | (B, h, w, C) | (B, N, C)
    with torch.enable_grad():
        if not feats.requires_grad:  # validation under no_grad: graph through the head only
            feats = feats.detach().requires_grad_(True)
        logits, weights = _channel_weights(model, mlp, head_w, feats, target, create_graph, score)
    with torch.set_grad_enabled(outer_grad):
        fmap = features_to_nchw(model, feats)  # (B, C, h, w)
    return logits, fmap, weights


@torch.no_grad()
def grad_cams(
    model: nn.Module,
    images: torch.Tensor,
    targets: list[torch.Tensor | str],
    *,
    score: Literal["logit", "log_softmax"] = "logit",
    layer: Literal["last", "previous"] = "last",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``(B, K)`` and one Grad-CAM ``(B, 1, H, W)`` per target, from one forward pass of the
    features (evaluation: no graph is kept). Each extra target costs a pass through the head only
    (``layer="previous"``: a backward through the last stage and the head).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if layer != "last":
        parts = _previous_stage_parts(model, images, targets, False, score, layer)
        size = images.shape[-2:]
        cams = [cam_from_parts(f.detach(), w.detach(), size) for _, f, w in parts]
        return parts[-1][0].detach(), cams
    mlp = _conv_mlp_head(model)
    feats = model.forward_features(images).detach()
    cams, logits = [], None
    with torch.enable_grad():
        feats.requires_grad_(True)
        for target in targets:
            head_w = _conv_mlp_weight_views(mlp) if mlp is not None else None
            logits, weights = _channel_weights(model, mlp, head_w, feats, target, False, score)
            cams.append(
                cam_from_parts(features_to_nchw(model, feats.detach()), weights.detach(), images.shape[-2:])
            )
    return logits.detach(), cams


def check_cam_support(model: nn.Module, size: int, name: str) -> None:
    """Refuse a backbone whose Grad-CAM is all zero by construction (an attention loss on it would
    train nothing): a head that reads a class token only gives the patch tokens no gradient."""
    from .backbones import BackboneError

    was_training = model.training
    param = next(model.parameters())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(
        param.device, param.dtype
    )
    try:
        with torch.no_grad():
            _, _, weights = grad_cam_parts(model.eval(), x, "predicted")
    finally:
        model.train(was_training)
    if not torch.count_nonzero(weights):
        raise BackboneError(
            f"model.backbone {name!r}: the logits' gradient at its last feature map is 0 (a head that reads "
            "a class token only), so its Grad-CAM is all zero and an attention loss would train nothing. "
            "Use attention.lambda: 1 (plain cross-entropy), or a backbone that pools its patch tokens "
            "(for a timm ViT, global_pool='avg')"
        )


def previous_stage(model: nn.Module) -> nn.Module:
    """The stage before the last feature map, at twice its resolution (timm's ``feature_info``)."""
    from .backbones import BackboneError

    info = list(getattr(model, "feature_info", None) or [])
    if len(info) < 2:
        raise BackboneError(f"{type(model).__name__}: no feature_info stages: attention.layer must be last")
    last = info[-1]["reduction"]
    earlier = [f for f in info[:-1] if f["reduction"] * 2 == last]
    if not earlier:
        raise BackboneError(
            f"{type(model).__name__}: no stage at reduction {last // 2} before the last (reductions "
            f"{[f['reduction'] for f in info]}): attention.layer must be last"
        )
    return model.get_submodule(earlier[-1]["module"])


def _previous_stage_parts(model, images, targets, create_graph: bool, score: str, layer: str):
    """(logits, activation, channel weights) per target at :func:`previous_stage`, from one forward.

    Training (gradients on): the activation keeps its graph to the parameters below it. Otherwise
    the hook cuts it there, and only the last stage and the head get a (first-order) graph.
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    outer_grad = torch.is_grad_enabled()
    seen: dict[str, torch.Tensor] = {}

    def catch(_m, _i, out):
        if not outer_grad:
            out = out.detach().requires_grad_(True)
        seen["a"] = out
        return out

    stage = previous_stage(model)
    hook = stage.register_forward_hook(catch)
    plain = _plain_attention_after(model, stage) if create_graph else contextlib.nullcontext()
    try:
        with torch.enable_grad(), plain:
            logits = model.forward_head(model.forward_features(images))  # (B, K)
    finally:
        hook.remove()
    act = seen["a"]
    if act.ndim != 4:
        raise ValueError(
            f"attention.layer previous: the stage's output {tuple(act.shape)} is not a feature map"
        )
    out = []
    with torch.enable_grad():
        for target in targets:
            total = _target_score(logits, target, score)
            (grads,) = torch.autograd.grad(total, act, create_graph=create_graph, retain_graph=True)
            weights = grads.mean(dim=(2, 3))  # (B, C)
            out.append((logits if outer_grad else logits.detach(), act, weights))
    return out


@contextlib.contextmanager
def _plain_attention_after(model: nn.Module, stage: nn.Module) -> Iterator[None]:
    """timm's attention blocks registered after ``stage`` (not in it) compute attention in plain
    ops, which have a second derivative, for the duration: the fused kernels have none."""
    switched = []
    inside: str | None = None  # the stage's name prefix, once it is passed
    for name, module in model.named_modules():
        if module is stage:
            inside = name + "."
        elif inside and not name.startswith(inside) and getattr(module, "fused_attn", False) is True:
            module.fused_attn = False
            switched.append(module)
    try:
        yield
    finally:
        for module in switched:
            module.fused_attn = True


def _channel_weights(model, mlp, head_w, feats, target, create_graph: bool, score: str):
    """Logits and the CAM's channel weights: the head's shortcut where one exists, else autograd."""
    if mlp is not None:
        return _conv_mlp_weights(model, mlp, head_w, feats, target, create_graph, score)
    return _autograd_weights(model, feats, target, create_graph, score)


def cam_from_parts(fmap: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CAM ``(B, 1, *size)`` in [0, 1] = ReLU(Σ_c weights·fmap), bilinearly upsampled, min-max scaled."""
    fmap = fmap.float()  # (B, C, h, w)
    weights = weights.float()[:, :, None, None]  # (B, C, 1, 1)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    lo = cam.amin(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    hi = cam.amax(dim=(2, 3), keepdim=True)
    eps = _REL_EPS * hi + torch.finfo(cam.dtype).tiny  # scale-aware: see _REL_EPS
    return (cam - lo) / (hi - lo + eps)  # (B, 1, H, W) in [0, 1]


def _target_score(logits: torch.Tensor, target: torch.Tensor | str, score: str = "logit") -> torch.Tensor:
    """Sum over the batch of each row's target score (rows are independent, so one grad call)."""
    if isinstance(target, str):
        if target != "predicted":
            raise ValueError(f"target must be a class tensor or 'predicted', got {target!r}")
        cls = logits.detach().argmax(1)  # (B,)
    else:
        cls = torch.as_tensor(target, device=logits.device).long().view(-1)  # (B,)
    scores = torch.log_softmax(logits.float(), dim=1) if score == "log_softmax" else logits
    return scores.gather(1, cls[:, None]).sum()


def _autograd_weights(
    model, feats, target, create_graph: bool, score: str = "logit"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: spatial mean of d(score)/d(features) through the whole head."""
    logits = model.forward_head(feats)  # (B, K)
    total = _target_score(logits, target, score)
    (grads,) = torch.autograd.grad(total, feats, create_graph=create_graph, retain_graph=True)
    gmap = features_to_nchw(model, grads)  # (B, C, h, w)
    return logits, gmap.mean(dim=(2, 3))  # (B, K), (B, C)


def has_head_shortcut(model: nn.Module) -> bool:
    """Whether :func:`grad_cam` takes the channel weights by the kernel-sum shortcut for this
    model's head (VGG's ``ConvMlp``; see the module docstring) instead of a double backward."""
    return _conv_mlp_head(model) is not None


def _conv_mlp_head(model: nn.Module) -> nn.Module | None:
    """timm's VGG ``ConvMlp`` head when the kernel-sum shortcut is exact for it, else None.

    Needs: an unpadded, undilated, ungrouped ``fc1`` convolution (every output position sees
    the whole kernel, so the spatial gradient sum factors through the kernel sum), a 1×1
    ``fc2`` (a matrix over channels) and ReLUs after both (no curvature: the channel weights
    carry no derivative w.r.t. the features, exactly as in the double backward).
    """
    mlp = getattr(model, "pre_logits", None)
    if not isinstance(mlp, ConvMlp):
        return None
    fc1, fc2 = mlp.fc1, mlp.fc2
    ok = (
        type(fc1) is nn.Conv2d
        and type(fc2) is nn.Conv2d
        and tuple(fc1.padding) == (0, 0)
        and tuple(fc1.dilation) == (1, 1)
        and fc1.groups == 1
        and tuple(fc2.kernel_size) == (1, 1)
        and tuple(fc2.stride) == (1, 1)
        and tuple(fc2.padding) == (0, 0)
        and fc2.groups == 1
        and type(mlp.act1) is nn.ReLU
        and type(mlp.act2) is nn.ReLU
    )
    return mlp if ok else None


def _conv_mlp_weight_views(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1's kernel summed over its taps ``(M, C)`` and fc2 as a matrix ``(M2, M)``."""
    return mlp.fc1.weight.sum(dim=(2, 3)), mlp.fc2.weight.flatten(1)


def _conv_mlp_weights(
    model, mlp, head_w, feats, target, create_graph: bool, score: str = "logit"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel weights through VGG's head without differentiating its convolutions twice.

    ConvMlp resizes features smaller than the kernel with an average pool (rows sum to one,
    so it keeps the spatial gradient sum), then ``fc1`` (valid conv): for every channel c,
    Σ_hw ∂s/∂A[c, h, w] = Σ_o (Σ_ij ∂s/∂z1[o, i, j]) · Σ_hw W1[o, c, h, w].
    ∂s/∂z1 comes from autograd through the pool + classifier only, then by hand through
    ReLU → 1×1 fc2 (a matmul) → dropout (autograd, elementwise) → ReLU.
    """
    kernel_sum, w2 = head_w  # (M, C), (M2, M)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        mlp.act1.register_forward_hook(lambda _m, _i, out: seen.__setitem__("r1", out)),
        mlp.fc2.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("d1", inp[0])),
        mlp.act2.register_forward_hook(lambda _m, _i, out: seen.__setitem__("r2", out)),
    ]
    try:
        logits = model.forward_head(feats)  # (B, K): the model's own head, dropout included
    finally:
        for h in hooks:
            h.remove()
    r1, d1, r2 = seen["r1"], seen["d1"], seen["r2"]  # (B, M, oh, ow), same, (B, M2, oh, ow)
    total = _target_score(logits, target, score)
    (g_r2,) = torch.autograd.grad(total, r2, create_graph=create_graph, retain_graph=True)
    g_z2 = (g_r2 * (r2 > 0)).permute(0, 2, 3, 1)  # (B, oh, ow, M2)
    g_d1 = (g_z2 @ w2.to(g_z2.dtype)).permute(0, 3, 1, 2)  # (B, M, oh, ow): fc2 transposed
    if d1 is not r1:  # dropout between act1 and fc2 (train mode, p > 0): its mask, by autograd
        (g_d1,) = torch.autograd.grad(d1, r1, g_d1, create_graph=create_graph, retain_graph=True)
    g_z1 = (g_d1 * (r1 > 0)).sum(dim=(2, 3))  # (B, M): ∂s/∂z1 summed over output positions
    hw = feats.shape[-2] * feats.shape[-1]
    return logits, (g_z1 @ kernel_sum.to(g_z1.dtype)) / hw  # (B, K), (B, C)
