"""One trial end to end: train → validate per epoch, select on validation, test the best.

``run_trial(config, report=callback)`` is the library's single entry point. It never imports
Ray or MLflow: the caller (CLI, test, Ray trainable) passes ``report(metrics, epoch,
checkpoint_dir)``, called once per epoch after the epoch's checkpoint is on disk.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import cam
from .attention_loss import attention_loss, attention_term, create_loss_mode, select_attention_term
from .backbones import check_input_size, create_backbone
from .checkpoint import (
    BEST_FILE,
    CheckpointMismatchError,
    Progress,
    atomic_save,
    floats,
    load_checkpoint,
    model_payload,
    save_checkpoint,
)
from .config import AttentionConfig, ConfigError, TrialConfig, load_config
from .data.cache import SHAREABLE_ACCESS, Cache, CacheDataset, collate_batch, open_cache
from .data.transforms import BatchTransform
from .metrics import LocalizationScores, compute_metrics, evaluation_metric_names, higher_is_better
from .priors import prior_table, region_masks

__all__ = [
    "CheckpointMismatchError",
    "TrialDiverged",
    "amp_dtype",
    "resolve_device",
    "run_trial",
    "split_loader",
    "training_step",
]

Report = Callable[[dict[str, float], int, Path], None]


class TrialDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


# ---- public entry point -------------------------------------------------------------------------
def run_trial(
    config: TrialConfig | dict[str, Any] | str | Path,
    report: Report | None = None,
    *,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run one trial; return best-validation and test metrics plus bookkeeping.

    ``resume_from``: a checkpoint directory given to ``report`` earlier; training continues at
    the epoch after it, bit-for-bit as if never interrupted (on CPU).
    """
    cfg = load_config(config).resolve_paths()
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.resolved.yaml")

    device = resolve_device(cfg.train.device)
    _set_determinism(cfg.train.deterministic, device)
    cache = open_cache(cfg.data.cache, classes=cfg.data.classes)
    size = cfg.model.image_size or cache.size
    selection = cfg.train.selection_metric
    val_idx = cache.split_indices("val")
    valid = [f"val_{n}" for n in evaluation_metric_names(bool(cache.lesion_known[val_idx].any()))]
    if selection not in valid:
        raise ConfigError(f"train.selection_metric: {selection!r} is not logged; valid: {', '.join(valid)}")
    sign = 1.0 if higher_is_better(selection) else -1.0

    _seed_all(cfg.train.seed)
    model = create_backbone(
        cfg.model.backbone,
        num_classes=len(cfg.data.classes),
        pretrained_file=cfg.model.pretrained_file,
        drop_rate=cfg.model.drop_rate,
    ).to(device)
    check_input_size(model, size, cfg.model.backbone)
    use_cl = cfg.train.channels_last and device.type == "cuda"
    if use_cl:
        model = model.to(memory_format=torch.channels_last)

    loaders = {s: split_loader(cache, s, cfg, device) for s in ("train", "val", "test")}
    prep = BatchTransform(device, size=size, augment=cfg.data.augment, channels_last=use_cl)
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max" if sign > 0 else "min",
        factor=cfg.train.plateau_factor,
        patience=cfg.train.plateau_patience,
    )
    amp = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    table = prior_table(cfg.data.classes, cfg.attention.priors).to(device)
    term = select_attention_term(cfg.train.compile_attention and device.type == "cuda")

    ckpt_dir = out / "checkpoint"
    progress = Progress()
    if resume_from is not None:
        progress = load_checkpoint(Path(resume_from), cfg, model, optimizer, scheduler, scaler, device)
        if Path(resume_from).resolve() != ckpt_dir.resolve():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(resume_from) / BEST_FILE, ckpt_dir / BEST_FILE)

    for epoch in range(progress.next_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        _seed_all(cfg.train.seed * 100_003 + epoch)  # order, augmentation, dropout: f(seed, epoch)
        lam = cfg.attention.lambda_at(epoch)
        train_stats = _train_epoch(
            model, loaders["train"], prep, optimizer, scaler, cfg, lam, table, amp, term
        )
        t_train = time.perf_counter() - t0  # the epoch's stats are on the host: the device is done
        if not math.isfinite(train_stats["loss"]):
            raise TrialDiverged(f"trial {cfg.name}: non-finite training loss at epoch {epoch} (λ={lam:g})")
        val = _evaluate(model, loaders["val"], prep, cfg, table, amp)
        t_val = time.perf_counter() - t0 - t_train
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "lambda": lam,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"val_{k}": v for k, v in val["metrics"].items()},
        }
        score = metrics[selection]
        scheduler.step(score)
        first = progress.best_epoch < 0
        if first or (math.isfinite(score) and sign * score > sign * progress.best_score):
            progress.best_score, progress.best_epoch, progress.stale_epochs = score, epoch, 0
            atomic_save(model_payload(model, cfg, size, epoch, metrics), ckpt_dir / BEST_FILE)
        else:
            progress.stale_epochs += 1
        # training pass, validation pass, and the whole epoch (+ selection and best-model save)
        metrics |= {"epoch_train_s": t_train, "epoch_val_s": t_val, "epoch_time_s": time.perf_counter() - t0}
        progress.history.append(metrics)
        progress.next_epoch = epoch + 1
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, scaler, progress, cfg)
        if report is not None:
            report(dict(metrics), epoch, ckpt_dir)
        if progress.stale_epochs >= cfg.train.early_stop_patience:
            break

    best = torch.load(ckpt_dir / BEST_FILE, map_location=device, weights_only=False)
    model.load_state_dict(best["state_dict"])
    test = _evaluate(model, loaders["test"], prep, cfg, table, amp, keep_examples=16)
    best_row = next(h for h in progress.history if int(h["epoch"]) == progress.best_epoch)
    result: dict[str, Any] = {
        "name": cfg.name,
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.next_epoch,
        "selection_metric": selection,
        **{f"best_{k}": v for k, v in best_row.items() if k.startswith("val_")},
        **{f"test_{k}": v for k, v in test["metrics"].items()},
    }
    model_path = out / "model.pt"
    atomic_save({**best, "metrics": floats(result)}, model_path)
    result["model_path"] = str(model_path)
    result["output_dir"] = str(out)
    result["data_access"] = cache.data_access
    result["artifacts"] = [str(p) for p in _write_artifacts(out / "artifacts", test, cfg, cache)]
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ---- helpers --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` → the first visible CUDA device when CUDA exists, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_loader(
    cache: Cache, split: str, cfg: TrialConfig, device: torch.device
) -> torch.utils.data.DataLoader:
    """The DataLoader of one split as a trial reads it (training: shuffled by the trial's seed)."""
    # a training pass reads image, box and label only, unless augmentation moves the masks too
    ds = CacheDataset(cache, split, masks=split != "train" or cfg.data.augment)
    if len(ds) == 0:
        raise ConfigError(f"data.cache: {cache.path} has no {split!r} images")
    g = torch.Generator()
    g.manual_seed(cfg.train.seed)
    nw = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=split == "train",
        generator=g if split == "train" else None,
        collate_fn=collate_batch,
        num_workers=nw,
        pin_memory=device.type == "cuda",
        persistent_workers=nw > 0,
    )


def _optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)


def amp_dtype(cfg: TrialConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a trial: bf16 (fp16 where bf16 is missing) on CUDA with ``train.amp``."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
) -> tuple[torch.Tensor, ...]:
    """One optimisation step of ``λ·CE + (1−λ)·L_att``; returns detached loss, CE, L_att, logits.

    At λ = 1 the step is plain cross-entropy (no CAM). Otherwise the CAM's parts come from the
    same forward pass (:func:`~trainer.cam.grad_cam_parts`) and ``term`` turns them into L_att:
    :func:`~trainer.attention_loss.attention_term`, or its compiled twin
    (:func:`~trainer.attention_loss.select_attention_term`). A loss mode without a gradient
    (``paper``) builds no double-backward graph.
    """
    dev = x.device
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        if att.uses_attention and lam < 1.0:
            target = y if att.cam_target == "label" else "predicted"
            differentiable = create_loss_mode(att.mode).differentiable
            logits, fmap, weights = cam.grad_cam_parts(
                model, x, target, create_graph=differentiable, score=att.cam_score
            )  # (B, K), (B, C, h, w), (B, C)
            l_att = term(fmap, weights, box, y, table, tuple(x.shape[-2:]), att.mode, att.threshold, att.tau)
        else:
            logits = model(x)  # (B, K)
            l_att = torch.zeros((), device=dev)
    ce = F.cross_entropy(logits.float(), y)
    loss = lam * ce + (1.0 - lam) * l_att
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), ce.detach(), l_att.detach(), logits.detach()


def _train_epoch(model, loader, prep, optimizer, scaler, cfg: TrialConfig, lam: float, table, amp, term):
    model.train()
    loader.generator.manual_seed(torch.initial_seed())  # seeded per epoch by the caller: resumable order
    sums = torch.zeros(4, device=prep.device)  # loss, ce, attention, correct
    n = 0
    for raw in loader:
        b = prep(raw, train=True)
        y = b["label"]  # (B,)
        loss, ce, l_att, logits = training_step(
            model, b["image"], y, b["box"], optimizer, scaler, cfg.attention, lam, table, amp, term
        )
        bs = y.shape[0]
        n += bs
        sums += torch.stack([loss * bs, ce * bs, l_att * bs, (logits.argmax(1) == y).sum().float()])
    loss, ce, l_att, correct = (sums / max(n, 1)).tolist()
    return {"loss": loss, "ce": ce, "attention_loss": l_att, "accuracy": correct}


@torch.no_grad()
def _evaluate(model, loader, prep, cfg: TrialConfig, table, amp, keep_examples: int = 0) -> dict[str, Any]:
    """Metrics of §5 plus CE, attention loss and localization scores; CAMs target the true label."""
    model.eval()
    att = cfg.attention
    probs, labels = [], []
    # Sums stay on the device (one transfer at the end, no host sync per batch).
    losses = torch.zeros(2, dtype=torch.float64, device=prep.device)  # CE, L_att
    where = LocalizationScores(prep.device)
    examples: dict[str, list[torch.Tensor]] = {"image": [], "cam": [], "label": [], "pred": []}
    kept = 0
    for raw in loader:
        b = prep(raw, train=False)
        x, y = b["image"], b["label"]
        with torch.autocast(prep.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits, c = cam.grad_cam(model, x, y, score=att.cam_score)  # head-only graph under no_grad
        logits, c = logits.float(), c.float()
        region = region_masks(b["box"], y, table, x.shape[-2:])
        l_att = attention_loss(c, region, y, att.mode, att.threshold, att.tau)
        losses += torch.stack(
            [F.cross_entropy(logits, y, reduction="sum").double(), l_att.double() * y.shape[0]]
        )
        if raw["lesion_known"].any():  # the loader's CPU copy: no device sync
            where.update(c, region, y, b["lesion"], b["lesion_known"])
        else:
            where.update(c, region, y)
        p = logits.softmax(1)
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
    m["ce"] = ce_sum / n
    m["attention_loss"] = att_sum / n
    m.update(where.compute())
    out: dict[str, Any] = {"metrics": m, "y_true": y_true, "y_prob": y_prob}
    if kept:
        out["examples"] = {k: torch.cat(v) for k, v in examples.items()}
    return out


def _write_artifacts(art_dir: Path, test: dict[str, Any], cfg: TrialConfig, cache: Cache) -> list[Path]:
    from . import plots

    art_dir.mkdir(parents=True, exist_ok=True)
    classes = list(cfg.data.classes)
    paths = [
        plots.confusion_matrix_png(test["y_true"], test["y_prob"], classes, art_dir / "confusion_matrix.png"),
        plots.roc_png(test["y_true"], test["y_prob"], classes, art_dir / "roc.png"),
    ]
    # Patient images never leave the machine unless the dataset is marked public or synthetic.
    if cache.data_access in SHAREABLE_ACCESS and "examples" in test:
        paths.append(plots.cam_grid_png(test["examples"], classes, art_dir / "gradcam_test.png"))
    return paths
