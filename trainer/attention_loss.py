"""The localization-aware attention loss and its modes.

For one image with region mask R and Grad-CAM M in [0, 1]:

* ``paper``:  1 − |{M > t} ∩ R| / |R| — a hard count, computed without gradient exactly as
  the authors' code does (the update is then just λ·∇CE).
* ``soft``:   1 − Σ σ((M − t)/τ)·R / |R| — the count made smooth; equals ``paper`` as τ → 0.
* ``energy``: 1 − Σ M·R / Σ M — one minus the share of CAM mass inside the region.
* ``input_grad``: Σ S·(1 − R) / Σ S with S = ‖∂ log p(label)/∂x‖² per pixel — the share of the
  input gradient's energy outside the region (right for the right reasons, Ross et al. 2017, as a
  share so that λ weighs two terms in [0, 1]). R is the dilated lung mask (``attention.input_region:
  lung``) or the region prior (``prior``; the lung mask for No Finding). It acts on what the
  decision reads, not on where a feature map's CAM lies; every image counts, No Finding included.
  See :func:`input_gradient_term`: it needs the input's gradient with a graph (a double backward
  through the whole network).

No Finding images (label 0) and images without a region count 0; the batch loss is the mean
over all rows. The full objective is ``λ·CE + (1 − λ)·L_att``.

Each mode is registered (:data:`LOSS_MODES`) with what the trainer needs to know of it: whether
its value carries a gradient, and which attention settings (threshold, τ) it reads. Adding a mode
is one decorated function in this file and its properties in :mod:`trainer.loss_modes` (which
the configuration reads without importing PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._registry import Registry
from .loss_modes import BUILTIN_MODES

__all__ = [
    "LOSS_MODES",
    "LossMode",
    "attention_loss",
    "attention_term",
    "create_loss_mode",
    "fused_attention_term",
    "input_gradient_term",
    "select_attention_term",
]

_EPS = 1e-7
PerImageLoss = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LossMode:
    """An attention-loss mode: its per-image loss and the properties the trainer acts on."""

    name: str
    per_image: PerImageLoss  # (cam (B, 1, H, W), region (B, 1, H, W), threshold, tau) → (B,)
    differentiable: bool  # L_att carries a gradient to the model (else the update is λ·∇CE only)
    uses: frozenset[str]  # the attention settings it reads besides CAM and region
    input_gradient: bool = False  # the map is the input gradient's energy (input_gradient_term)


LOSS_MODES: Registry[LossMode] = Registry("attention-loss mode")


def _mode(name: str) -> Callable[[PerImageLoss], PerImageLoss]:
    """Register ``fn`` as loss mode ``name``, with the properties :mod:`trainer.loss_modes` gives it."""
    info = BUILTIN_MODES[name]

    def deco(fn: PerImageLoss) -> PerImageLoss:
        mode = LossMode(name, fn, info.differentiable, info.uses, info.input_gradient)
        LOSS_MODES.register(name)(lambda: mode)
        return fn

    return deco


def _area(region: torch.Tensor) -> torch.Tensor:
    return region.sum(dim=(1, 2, 3)).clamp_min(1.0)  # (B,)


@_mode("paper")
def _paper(cam: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    with torch.no_grad():
        hits = ((cam > threshold).float() * region).sum(dim=(1, 2, 3))  # (B,)
        return 1.0 - hits / _area(region)


@_mode("soft")
def _soft(cam: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    soft_hits = (torch.sigmoid((cam - threshold) / tau) * region).sum(dim=(1, 2, 3))  # (B,)
    return 1.0 - soft_hits / _area(region)


@_mode("energy")
def _energy(cam: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    inside = (cam * region).sum(dim=(1, 2, 3))  # (B,)
    return 1.0 - inside / cam.sum(dim=(1, 2, 3)).clamp_min(_EPS)


@_mode("input_grad")
def _input_grad(saliency: torch.Tensor, region: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    outside = (saliency * (1.0 - region)).sum(dim=(1, 2, 3))  # (B,)
    return outside / saliency.sum(dim=(1, 2, 3)).clamp_min(torch.finfo(saliency.dtype).tiny)


def input_gradient_term(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, region: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, K)`` and the ``input_grad`` loss (batch mean) from one forward pass.

    The gradient of Σ log p(label) w.r.t. the input is taken with a graph when gradients are on
    (training: the loss then trains the model through a double backward), without one otherwise.
    ``region`` ``(B, 1, H, W)``: where the decision may read. A row with an empty region counts 0.
    """
    training = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)  # (B, K)
        log_p = torch.log_softmax(logits.float(), dim=1).gather(1, labels.long()[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x, create_graph=training)
    saliency = grad.float().pow(2).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    per_image = create_loss_mode("input_grad").per_image(saliency, region.float(), 0.5, 1.0)
    counts = region.sum(dim=(1, 2, 3)) > 0
    loss = torch.where(counts, per_image, torch.zeros_like(per_image)).mean()
    return (logits, loss) if training else (logits.detach(), loss.detach())


def create_loss_mode(name: str) -> LossMode:
    """Loss mode ``name``; unknown names raise with the valid list."""
    return LOSS_MODES.create(name)


def attention_loss(
    cam: torch.Tensor,
    region: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "paper",
    threshold: float = 0.5,
    tau: float = 0.05,
) -> torch.Tensor:
    """Batch mean of L_att; ``cam``/``region`` ``(B, 1, H, W)``, ``labels`` ``(B,)``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    per_image = create_loss_mode(mode).per_image(
        cam.float(), region.float(), threshold=threshold, tau=tau
    )  # (B,)
    counts = (labels != 0) & (region.sum(dim=(1, 2, 3)) > 0)  # (B,)
    return torch.where(counts, per_image, torch.zeros_like(per_image)).mean()


def attention_term(
    fmap: torch.Tensor,
    weights: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    table: torch.Tensor,
    size: tuple[int, int],
    mode: str = "paper",
    threshold: float = 0.5,
    tau: float = 0.05,
) -> torch.Tensor:
    """L_att from Grad-CAM's parts (:func:`trainer.cam.grad_cam_parts`) in one function.

    CAM (:func:`~trainer.cam.cam_from_parts`) → prior region masks
    (:func:`~trainer.priors.region_masks`) → :func:`attention_loss`: the same value as those
    three called in turn. As one function it can be compiled (:func:`fused_attention_term`).
    """
    from .cam import cam_from_parts
    from .priors import region_masks

    cam = cam_from_parts(fmap, weights, size)  # (B, 1, H, W)
    region = region_masks(boxes, labels, table, size)  # (B, 1, H, W)
    return attention_loss(cam, region, labels, mode, threshold, tau)


class _Fused:
    """The process's compiled :func:`attention_term`, the input signatures it was checked on, and
    why compiling failed (``None`` while it has not)."""

    fn: ClassVar[Callable[..., torch.Tensor] | None] = None
    checked: ClassVar[set[tuple]] = set()
    failed: ClassVar[str | None] = None


def _signature(args: tuple, kwargs: dict) -> tuple:
    def sig(a):
        return (tuple(a.shape), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


def _check_compiled(fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> None:
    """Compile forward *and* backward for this signature now, on detached copies of the inputs:
    torch.compile builds the backward lazily, at the first ``backward()``, where a failure could
    no longer fall back to eager."""

    def leaf(a):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return a.detach().requires_grad_(True)
        return a

    args2 = tuple(leaf(a) for a in args)
    kwargs2 = {k: leaf(v) for k, v in kwargs.items()}
    out = fn(*args2, **kwargs2)
    leaves = [a for a in (*args2, *kwargs2.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    if out.requires_grad and leaves:
        torch.autograd.grad(out, leaves, allow_unused=True)


def fused_attention_term(*args, **kwargs) -> torch.Tensor:
    """:func:`attention_term` through ``torch.compile``: about a hundred small elementwise and
    reduction ops (and their backward) fused into a few kernels, which pays where a step is
    bound by kernel launches (a GPU at batch 32–64; see docs/performance.md).

    Compiled once per process and input signature (a new batch size compiles again). Before a
    signature's first use its forward and backward are compiled and run once on detached copies
    of the inputs, so a compilation failure (no Triton, an unsupported build) is caught here:
    the eager function then runs for the rest of the process, after one warning. An error the
    eager function raises as well (a bad threshold, out of memory) is raised, not taken for a
    compilation failure.
    """
    if _Fused.failed is None:
        try:
            if _Fused.fn is None:
                _Fused.fn = torch.compile(attention_term)
            sig = _signature(args, kwargs)
            if sig not in _Fused.checked:
                _check_compiled(_Fused.fn, args, kwargs)
                _Fused.checked.add(sig)
            return _Fused.fn(*args, **kwargs)
        except Exception as e:
            out = attention_term(*args, **kwargs)  # raises too if the inputs, not compiling, are at fault
            _Fused.failed = f"{type(e).__name__}: {e}"
            import warnings

            warnings.warn(
                f"train.compile_attention: torch.compile failed, the attention term runs eager: "
                f"{_Fused.failed[:300]}",
                RuntimeWarning,
                stacklevel=2,
            )
            return out
    return attention_term(*args, **kwargs)


def select_attention_term(compiled: bool) -> Callable[..., torch.Tensor]:
    """The attention term a training step calls: :func:`fused_attention_term` (``torch.compile``,
    ``train.compile_attention`` on CUDA) or the eager :func:`attention_term`; same arguments, same value."""
    return fused_attention_term if compiled else attention_term
