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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .attention_loss import attention_loss, fused_attention_term
from .backbones import check_input_size, create_backbone
from .cam import cam_in_region, grad_cam, grad_cam_parts, pointing_hits, pointing_tolerance
from .config import AttentionConfig, ConfigError, TrialConfig, load_config
from .data.cache import SHAREABLE_ACCESS, Cache, CacheDataset, collate_batch, open_cache
from .data.transforms import BatchTransform
from .metrics import METRIC_NAMES, compute_metrics, higher_is_better
from .priors import prior_table, region_masks

__all__ = ["CheckpointMismatchError", "TrialDiverged", "run_trial", "training_step"]

Report = Callable[[dict[str, float], int, Path], None]
STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


class TrialDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different backbone, task or image size."""


@dataclass
class _Progress:
    """Loop state saved in every checkpoint."""

    next_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


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
    valid = _val_metric_names(cache)
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

    loaders = {s: _loader(cache, s, cfg, device) for s in ("train", "val", "test")}
    prep = BatchTransform(device, size=size, augment=cfg.data.augment, channels_last=use_cl)
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max" if sign > 0 else "min",
        factor=cfg.train.plateau_factor,
        patience=cfg.train.plateau_patience,
    )
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    table = prior_table(cfg.data.classes, cfg.attention.priors).to(device)
    fused = cfg.train.compile_attention and device.type == "cuda"

    ckpt_dir = out / "checkpoint"
    progress = _Progress()
    if resume_from is not None:
        progress = _load_checkpoint(Path(resume_from), cfg, model, optimizer, scheduler, scaler, device)
        if Path(resume_from).resolve() != ckpt_dir.resolve():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(resume_from) / BEST_FILE, ckpt_dir / BEST_FILE)

    for epoch in range(progress.next_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        _seed_all(cfg.train.seed * 100_003 + epoch)  # order, augmentation, dropout: f(seed, epoch)
        lam = cfg.attention.lambda_at(epoch)
        train_stats = _train_epoch(
            model, loaders["train"], prep, optimizer, scaler, cfg, lam, table, amp_dtype, fused
        )
        t_train = time.perf_counter() - t0  # the epoch's stats are on the host: the device is done
        if not math.isfinite(train_stats["loss"]):
            raise TrialDiverged(f"trial {cfg.name}: non-finite training loss at epoch {epoch} (λ={lam:g})")
        val = _evaluate(model, loaders["val"], prep, cfg, table, amp_dtype)
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
            _atomic_save(_model_payload(model, cfg, size, epoch, metrics), ckpt_dir / BEST_FILE)
        else:
            progress.stale_epochs += 1
        # training pass, validation pass, and the whole epoch (+ selection and best-model save)
        metrics |= {"epoch_train_s": t_train, "epoch_val_s": t_val, "epoch_time_s": time.perf_counter() - t0}
        progress.history.append(metrics)
        progress.next_epoch = epoch + 1
        _save_checkpoint(ckpt_dir, model, optimizer, scheduler, scaler, progress, cfg)
        if report is not None:
            report(dict(metrics), epoch, ckpt_dir)
        if progress.stale_epochs >= cfg.train.early_stop_patience:
            break

    best = torch.load(ckpt_dir / BEST_FILE, map_location=device, weights_only=False)
    model.load_state_dict(best["state_dict"])
    test = _evaluate(model, loaders["test"], prep, cfg, table, amp_dtype, keep_examples=16)
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
    _atomic_save({**best, "metrics": _floats(result)}, model_path)
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


def _val_metric_names(cache: Cache) -> list[str]:
    names = [
        *METRIC_NAMES,
        "youden_threshold",
        "youden_index_optimal",
        "ce",
        "attention_loss",
        "cam_in_prior",
    ]
    val_idx = cache.split_indices("val")
    if len(val_idx) and bool(cache.lesion_known[val_idx].any()):
        names += ["pointing_game", "cam_in_region"]
    return [f"val_{n}" for n in names]


def _loader(cache: Cache, split: str, cfg: TrialConfig, device: torch.device) -> torch.utils.data.DataLoader:
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


def _amp_dtype(cfg: TrialConfig, device: torch.device) -> torch.dtype | None:
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
    amp_dtype: torch.dtype | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One optimisation step of ``λ·CE + (1−λ)·L_att``; returns detached loss, CE, L_att, logits.

    At λ = 1 the step is plain cross-entropy (no CAM). Otherwise the CAM comes from the same
    forward pass (:func:`~trainer.cam.grad_cam`); ``paper`` mode builds no double-backward graph.
    ``fused``: the CAM → region → loss tail runs compiled (``train.compile_attention``).
    """
    dev = x.device
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if att.uses_attention and lam < 1.0 and fused:
            target = y if att.cam_target == "label" else "predicted"
            logits, fmap, weights = grad_cam_parts(
                model, x, target, create_graph=att.mode != "paper", score=att.cam_score
            )  # (B, K), (B, C, h, w), (B, C)
            l_att = fused_attention_term(
                fmap, weights, box, y, table, tuple(x.shape[-2:]), att.mode, att.threshold, att.tau
            )
        elif att.uses_attention and lam < 1.0:
            target = y if att.cam_target == "label" else "predicted"
            logits, cam = grad_cam(
                model, x, target, create_graph=att.mode != "paper", score=att.cam_score
            )  # (B, K), (B, 1, S, S)
            region = region_masks(box, y, table, x.shape[-2:])  # (B, 1, S, S)
            l_att = attention_loss(cam, region, y, att.mode, att.threshold, att.tau)
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


def _train_epoch(
    model, loader, prep, optimizer, scaler, cfg: TrialConfig, lam: float, table, amp_dtype, fused=False
):
    model.train()
    loader.generator.manual_seed(torch.initial_seed())  # seeded per epoch by the caller: resumable order
    sums = torch.zeros(4, device=prep.device)  # loss, ce, attention, correct
    n = 0
    for raw in loader:
        b = prep(raw, train=True)
        y = b["label"]  # (B,)
        loss, ce, l_att, logits = training_step(
            model, b["image"], y, b["box"], optimizer, scaler, cfg.attention, lam, table, amp_dtype, fused
        )
        bs = y.shape[0]
        n += bs
        sums += torch.stack([loss * bs, ce * bs, l_att * bs, (logits.argmax(1) == y).sum().float()])
    loss, ce, l_att, correct = (sums / max(n, 1)).tolist()
    return {"loss": loss, "ce": ce, "attention_loss": l_att, "accuracy": correct}


@torch.no_grad()
def _evaluate(
    model, loader, prep, cfg: TrialConfig, table, amp_dtype, keep_examples: int = 0
) -> dict[str, Any]:
    """Metrics of §5 plus CE, attention loss and localization scores; CAMs target the true label."""
    model.eval()
    att = cfg.attention
    probs, labels = [], []
    # Sums stay on the device (one transfer at the end, no host sync per batch): CE, L_att,
    # CAM-in-prior share and count, pointing hits, CAM-in-lesion share and count.
    sums = torch.zeros(7, dtype=torch.float64, device=prep.device)
    examples: dict[str, list[torch.Tensor]] = {"image": [], "cam": [], "label": [], "pred": []}
    kept = 0
    for raw in loader:
        b = prep(raw, train=False)
        x, y = b["image"], b["label"]
        with torch.autocast(
            prep.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits, cam = grad_cam(model, x, y, score=att.cam_score)  # head-only graph under no_grad
        logits, cam = logits.float(), cam.float()
        region = region_masks(b["box"], y, table, x.shape[-2:])
        pos = (y != 0) & (region.sum(dim=(1, 2, 3)) > 0)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        parts = [
            F.cross_entropy(logits, y, reduction="sum").double(),
            attention_loss(cam, region, y, att.mode, att.threshold, att.tau).double() * y.shape[0],
            torch.where(pos, cam_in_region(cam, region).double(), zero).sum(),
            pos.sum().double(),
        ]
        if raw["lesion_known"].any():  # the loader's CPU copy: no device sync
            known = b["lesion_known"] & (y != 0) & (b["lesion"].sum(dim=(1, 2, 3)) > 0)
            tol = pointing_tolerance(x.shape[-1])
            parts += [
                torch.where(known, pointing_hits(cam, b["lesion"], tol).double(), zero).sum(),
                torch.where(known, cam_in_region(cam, b["lesion"]).double(), zero).sum(),
                known.sum().double(),
            ]
        else:
            parts += [zero, zero, zero]
        sums += torch.stack(parts)
        p = logits.softmax(1)
        probs.append(p)
        labels.append(y)
        if kept < keep_examples:
            take = keep_examples - kept
            examples["image"].append(x[:take, :1].cpu())
            examples["cam"].append(cam[:take].cpu())
            examples["label"].append(y[:take].cpu())
            examples["pred"].append(p[:take].argmax(1).cpu())
            kept += len(examples["label"][-1])
    ce_sum, att_sum, prior_share, prior_n, hits, lesion_share, lesion_n = sums.tolist()
    y_prob = torch.cat(probs).double().cpu().numpy()
    y_true = torch.cat(labels).cpu().numpy()
    n = len(y_true)
    m = compute_metrics(y_true, y_prob)
    m["ce"] = ce_sum / n
    m["attention_loss"] = att_sum / n
    m["cam_in_prior"] = prior_share / prior_n if prior_n else 0.0
    if lesion_n:
        m["pointing_game"] = hits / lesion_n
        m["cam_in_region"] = lesion_share / lesion_n
    out: dict[str, Any] = {"metrics": m, "y_true": y_true, "y_prob": y_prob}
    if kept:
        out["examples"] = {k: torch.cat(v) for k, v in examples.items()}
    return out


def _model_payload(
    model, cfg: TrialConfig, size: int, epoch: int, metrics: dict[str, float]
) -> dict[str, Any]:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": cfg.model.backbone,
        "classes": list(cfg.data.classes),
        "image_size": size,
        "normalization": {"mean": 0.5, "std": 0.5},
        "epoch": epoch,
        "config": cfg.to_dict(),
        "metrics": _floats(metrics),
    }


def _floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float)}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, scaler, progress: _Progress, cfg) -> None:
    _atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": asdict(progress),
            "identity": _identity(cfg),
        },
        ckpt_dir / STATE_FILE,
    )


def _identity(cfg: TrialConfig) -> dict[str, Any]:
    return {
        "backbone": cfg.model.backbone,
        "classes": list(cfg.data.classes),
        "image_size": cfg.model.image_size,
    }


def _load_checkpoint(ckpt_dir: Path, cfg, model, optimizer, scheduler, scaler, device) -> _Progress:
    f = ckpt_dir / STATE_FILE
    if not f.is_file() or not (ckpt_dir / BEST_FILE).is_file():
        raise CheckpointMismatchError(
            f"{ckpt_dir}: not a trial checkpoint (needs {STATE_FILE} and {BEST_FILE})"
        )
    state = torch.load(f, map_location=device, weights_only=False)
    mine, theirs = _identity(cfg), state.get("identity", {})
    if mine != theirs:
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        raise CheckpointMismatchError(f"{f}: written for a different trial (checkpoint, config): {diff}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return _Progress(**state["progress"])


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
