"""One epoch's work: the training step of ``λ·CE + (1−λ)·L_att``, a training pass, an evaluation pass.

Batched tensor code throughout; sums stay on the device until a pass ends (one host transfer per
pass, no sync per batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import cam
from .attention_loss import attention_loss, attention_term, create_loss_mode, input_gradient_term
from .config import AttentionConfig, TrialConfig
from .metrics import LocalizationScores, compute_metrics
from .outside import OutsideScores, fill_outside, lung_region, outside_augment
from .priors import region_masks

__all__ = ["Step", "evaluate", "input_region", "train_epoch", "training_step"]


class Step(NamedTuple):
    """What one training step returns (detached): the losses, the logits, and how its CAMs went."""

    loss: torch.Tensor
    ce: torch.Tensor
    attention: torch.Tensor
    logits: torch.Tensor  # (B, K)
    cam_zero: torch.Tensor  # images whose CAM was all zero (0 when the step computed none)
    grad_ratio: float | None = None  # ‖∇L_att‖ / ‖∇CE‖ over the parameters, when measured


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _cam_parts(model, x: torch.Tensor, y: torch.Tensor, att: AttentionConfig):
    """Logits and the CAM's parts for the attention term, by ``attention.cam_pass``.

    ``train``: from the training forward pass itself (one forward; BatchNorm uses the batch's
    statistics, dropout is on). ``eval``: the authors' way, a second pass in eval mode (running
    statistics, no dropout) at the class the training pass predicts; it costs one more forward,
    and for a differentiable mode its backward too.
    """
    target = y if att.cam_target == "label" else "predicted"
    differentiable = create_loss_mode(att.mode).differentiable
    if att.cam_pass == "train":
        return cam.grad_cam_parts(
            model, x, target, create_graph=differentiable, score=att.cam_score, layer=att.layer
        )
    logits = model(x)  # (B, K)
    if att.cam_target == "predicted":
        target = logits.detach().argmax(1)
    with _eval_mode(model), torch.set_grad_enabled(differentiable):
        _, fmap, weights = cam.grad_cam_parts(
            model, x, target, create_graph=differentiable, score=att.cam_score, layer=att.layer
        )
    return logits, fmap, weights


def _all_zero(fmap: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """How many images' CAMs are flat, hence all zero once scaled (B,) → count."""
    with torch.no_grad():
        raw = F.relu((weights.float()[:, :, None, None] * fmap.float()).sum(dim=1)).flatten(1)  # (B, h·w)
        return (raw.amax(dim=1) <= raw.amin(dim=1)).sum()


def _grad_ratio(model: torch.nn.Module, ce: torch.Tensor, l_att: torch.Tensor) -> float:
    """‖∇L_att‖ / ‖∇CE‖ over the trainable parameters (two extra backward passes; 0 without a gradient)."""
    if not l_att.requires_grad:
        return 0.0
    params = [p for p in model.parameters() if p.requires_grad]

    def norm(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))

    return float(norm(l_att) / norm(ce).clamp_min(1e-30))


def input_region(cfg: TrialConfig, batch: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """Where mode ``input_grad`` lets the decision read ``(B, 1, H, W)``: the dilated lung mask, or
    (``attention.input_region: prior``) each finding's region prior, the lung mask where it has none."""
    if "lung" not in batch:
        raise ValueError("mode input_grad needs the batch's lung masks")
    keep = lung_region(batch["lung"], cfg.outside.dilate_px)
    if cfg.attention.input_region == "prior":
        prior = region_masks(batch["box"], batch["label"], table, keep.shape[-2:])
        has = prior.sum(dim=(1, 2, 3)) > 0
        keep = torch.where(has[:, None, None, None], prior.to(keep.dtype), keep)
    return keep


def training_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    box: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    att: AttentionConfig,
    lam: float,
    table: torch.Tensor,
    amp: torch.dtype | None = None,
    term: Callable[..., torch.Tensor] = attention_term,
    balance: bool = False,
    region: torch.Tensor | None = None,
) -> Step:
    """One optimisation step of ``λ·CE + (1−λ)·L_att`` (see :class:`Step`).

    At λ = 1 the step is plain cross-entropy (no CAM). Otherwise the CAM's parts come from
    :func:`~trainer.cam.grad_cam_parts` (see ``attention.cam_pass``) and ``term`` turns them into
    L_att: :func:`~trainer.attention_loss.attention_term`, or its compiled twin
    (:func:`~trainer.attention_loss.select_attention_term`). A loss mode without a gradient
    (``paper``) builds no double-backward graph. ``balance`` also measures ‖∇L_att‖ / ‖∇CE‖.
    Mode ``input_grad`` takes no CAM: its term is the input gradient's share outside ``region``
    (:func:`input_region`; :func:`~trainer.attention_loss.input_gradient_term`).
    """
    dev = x.device
    attending = att.uses_attention and lam < 1.0
    cam_zero = torch.zeros((), device=dev)
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        if attending and create_loss_mode(att.mode).input_gradient:
            if region is None:
                raise ValueError("mode input_grad needs the region the decision may read")
            logits, l_att = input_gradient_term(model, x, y, region)
        elif attending:
            logits, fmap, weights = _cam_parts(model, x, y, att)  # (B, K), (B, C, h, w), (B, C)
            l_att = term(fmap, weights, box, y, table, tuple(x.shape[-2:]), att.mode, att.threshold, att.tau)
            cam_zero = _all_zero(fmap, weights)
        else:
            logits = model(x)  # (B, K)
            l_att = torch.zeros((), device=dev)
    ce = F.cross_entropy(logits.float(), y)
    loss = lam * ce + (1.0 - lam) * l_att
    ratio = _grad_ratio(model, ce, l_att) if balance and attending else None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return Step(loss.detach(), ce.detach(), l_att.detach(), logits.detach(), cam_zero, ratio)


def train_epoch(model, loader, prep, optimizer, scaler, cfg: TrialConfig, lam: float, table, amp, term):
    """One training pass: mean loss, CE, L_att and accuracy; with attention on, the share of
    all-zero CAMs and ‖∇L_att‖ / ‖∇CE‖ on the first batch."""
    model.train()
    loader.generator.manual_seed(torch.initial_seed())  # seeded per epoch by the caller: resumable order
    sums = torch.zeros(5, device=prep.device)  # loss, ce, attention, correct, all-zero CAMs
    n, ratio = 0, None
    out = cfg.outside
    by_input = (
        cfg.attention.uses_attention and lam < 1.0 and create_loss_mode(cfg.attention.mode).input_gradient
    )
    for i, raw in enumerate(loader):
        b = prep(raw, train=True)
        y = b["label"]  # (B,)
        x = b["image"]
        if out.augment > 0:  # the outside_mask baseline: some images lose everything outside the lungs
            x = outside_augment(x, b["lung"], out.augment, out.fill, out.dilate_px)
        region = input_region(cfg, b, table) if by_input else None
        step = training_step(
            model, x, y, b["box"], optimizer, scaler, cfg.attention, lam, table, amp, term, i == 0, region
        )
        bs = y.shape[0]
        n += bs
        ratio = step.grad_ratio if i == 0 else ratio
        correct = (step.logits.argmax(1) == y).sum().float()
        sums += torch.stack(
            [step.loss * bs, step.ce * bs, step.attention * bs, correct, step.cam_zero.float()]
        )
    loss, ce, l_att, correct, zero = (sums / max(n, 1)).tolist()
    stats = {"loss": loss, "ce": ce, "attention_loss": l_att, "accuracy": correct}
    if cfg.attention.uses_attention and lam < 1.0:
        stats |= {"cam_zero_fraction": zero, "grad_ratio": ratio if ratio is not None else float("nan")}
    return stats


@torch.no_grad()
def evaluate(
    model,
    loader,
    prep,
    cfg: TrialConfig,
    table,
    amp,
    lam: float,
    keep_examples: int = 0,
    outside_limit: int = 0,
) -> dict[str, Any]:
    """Metrics of §5, the objective (``loss``) and its parts, the localization scores, and (with
    ``outside.score``) what the decision reads outside the lungs, on the first ``outside_limit``
    images (0: all; :mod:`trainer.outside`).

    The attention loss follows the training rule (``attention.cam_target``), so ``val_loss`` and
    ``val_attention_loss`` measure what ``train_loss`` and ``train_attention_loss`` do; the
    localization scores and the kept examples use the CAM of the true label.
    """
    model.eval()
    att = cfg.attention
    by_input = create_loss_mode(att.mode).input_gradient
    outside = OutsideScores() if cfg.outside.score else None
    noise = torch.Generator(device=prep.device).manual_seed(0)  # the same noise fill every pass
    scored = 0
    rule = [] if att.cam_target == "label" else ["predicted"]  # the training rule's CAM, when it differs
    probs, labels = [], []
    losses = torch.zeros(2, dtype=torch.float64, device=prep.device)  # CE, L_att
    where = LocalizationScores(prep.device)
    examples: dict[str, list[torch.Tensor]] = {"image": [], "cam": [], "label": [], "pred": []}
    kept = 0
    for raw in loader:
        b = prep(raw, train=False)
        x, y = b["image"], b["label"]
        with torch.autocast(prep.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits, cams = cam.grad_cams(model, x, [y, *rule], score=att.cam_score, layer=att.layer)
        logits, c, c_rule = logits.float(), cams[0].float(), cams[-1].float()
        region = region_masks(b["box"], y, table, x.shape[-2:])
        if by_input:
            l_att = input_gradient_term(model, x, y, input_region(cfg, b, table))[1]
        else:
            l_att = attention_loss(c_rule, region, y, att.mode, att.threshold, att.tau)
        losses += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), l_att.double() * len(y)])
        if raw["lesion_known"].any():  # the loader's CPU copy: no device sync
            where.update(c, region, y, b["lesion"], b["lesion_known"])
        else:
            where.update(c, region, y)
        p = logits.softmax(1)
        if outside is not None and (not outside_limit or scored < outside_limit):
            take = len(y) if not outside_limit else min(len(y), outside_limit - scored)
            keep = lung_region(b["lung"][:take], cfg.outside.dilate_px)
            lungs_only = fill_outside(x[:take], keep, cfg.outside.fill, noise)
            with torch.autocast(prep.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                p_in = model(lungs_only).float().softmax(1)
            outside.update(p[:take], p_in, y[:take])
            scored += take
        probs.append(p)
        labels.append(y)
        if kept < keep_examples:
            take = keep_examples - kept
            examples["image"].append(x[:take, :1].cpu())
            examples["cam"].append(c[:take].cpu())
            examples["label"].append(y[:take].cpu())
            examples["pred"].append(p[:take].argmax(1).cpu())
            kept += len(examples["label"][-1])
    ce_sum, att_sum = losses.tolist()
    y_prob = torch.cat(probs).double().cpu().numpy()
    y_true = torch.cat(labels).cpu().numpy()
    n = len(y_true)
    m = compute_metrics(y_true, y_prob)
    m |= {"ce": ce_sum / n, "attention_loss": att_sum / n}
    m["loss"] = lam * m["ce"] + (1.0 - lam) * m["attention_loss"]
    m.update(where.compute())
    if outside is not None:
        m.update(outside.compute(len(cfg.data.classes)))
    out: dict[str, Any] = {"metrics": m, "y_true": y_true, "y_prob": y_prob}
    if kept:
        out["examples"] = {k: torch.cat(v) for k, v in examples.items()}
    return out
