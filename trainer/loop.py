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
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention_loss import select_attention_term
from .backbones import check_input_size, create_backbone
from .cam import check_cam_support, previous_stage
from .checkpoint import (
    BEST_FILE,
    CheckpointMismatchError,
    Progress,
    atomic_save,
    floats,
    load_checkpoint,
    model_payload,
    read_progress,
    safe_load,
    save_checkpoint,
)
from .config import ConfigError, TrialConfig, load_config
from .data.cache import SHAREABLE_ACCESS, Cache, CacheDataset, collate_batch, open_cache
from .data.splits import SPLITS
from .data.transforms import BatchTransform
from .epoch import evaluate, train_epoch
from .errors import UserError
from .loss_modes import mode_info
from .metrics import check_metric, higher_is_better, logged_names
from .priors import prior_table

__all__ = [
    "LAST_EPOCH",
    "CheckpointMismatchError",
    "TrialDiverged",
    "amp_dtype",
    "last_report",
    "plateau_scheduler",
    "resolve_device",
    "run_trial",
    "split_loader",
    "trial_steps",
]

Report = Callable[[dict[str, float], int, Path], None]
LAST_EPOCH = "last_epoch"  # 1.0 in the report of the last epoch a trial trains (by epochs or early stopping)


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
    steps = trial_steps(config, resume_from=resume_from)
    while True:
        try:
            metrics, epoch, ckpt_dir = next(steps)
        except StopIteration as done:
            return done.value
        if report is not None:
            report(metrics, epoch, ckpt_dir)


def trial_steps(
    config: TrialConfig | dict[str, Any] | str | Path,
    *,
    resume_from: str | Path | None = None,
) -> Generator[tuple[dict[str, float], int, Path], None, dict[str, Any]]:
    """:func:`run_trial` one epoch at a time: yields ``(metrics, epoch, checkpoint_dir)`` after each
    epoch's checkpoint is on disk and returns the trial's result. Several trials stepped in turn
    (seed repeats, :mod:`trainer.repeats`) each give what they give alone: every epoch reseeds.
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
    try:  # the config checked the name; here, whether this cache lets a trial log it
        check_metric(selection, logged_names("val_", bool(cache.lesion_known[val_idx].any())))
        sign = 1.0 if higher_is_better(selection) else -1.0
    except UserError as e:
        raise ConfigError(f"train.selection_metric: {e} (in {cache.path})") from None

    _seed_all(cfg.train.seed)
    model = create_backbone(
        cfg.model.backbone,
        num_classes=len(cfg.data.classes),
        pretrained_file=cfg.model.pretrained_file,
        drop_rate=cfg.model.drop_rate,
    ).to(device)
    check_input_size(model, size, cfg.model.backbone)
    if cfg.attention.uses_attention and not mode_info(cfg.attention.mode).input_gradient:
        check_cam_support(model, size, cfg.model.backbone)  # input_grad steers no CAM
    if cfg.attention.layer != "last":
        previous_stage(model)  # a backbone without an earlier stage fails here, before training
    use_cl = cfg.train.channels_last and device.type == "cuda"
    if use_cl:
        model = model.to(memory_format=torch.channels_last)

    loaders = {s: split_loader(cache, s, cfg, device) for s in SPLITS}
    prep = BatchTransform(device, size=size, augment=cfg.data.augment, channels_last=use_cl)
    optimizer = _optimizer(cfg, model)
    scheduler, plateau_on = plateau_scheduler(cfg, optimizer)
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

    # a checkpoint of a trial that had stopped early (then crashed before its test) trains no more
    stopped = progress.stale_epochs >= cfg.train.early_stop_patience
    for epoch in range(cfg.train.epochs if stopped else progress.next_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        _seed_all(cfg.train.seed * 100_003 + epoch)  # order, augmentation, dropout: f(seed, epoch)
        lam = cfg.attention.lambda_at(epoch)
        train_stats = train_epoch(
            model, loaders["train"], prep, optimizer, scaler, cfg, lam, table, amp, term
        )
        t_train = time.perf_counter() - t0  # the epoch's stats are on the host: the device is done
        if not math.isfinite(train_stats["loss"]):
            raise TrialDiverged(f"trial {cfg.name}: non-finite training loss at epoch {epoch} (λ={lam:g})")
        if train_stats.get("cam_zero_fraction") == 1.0:
            warnings.warn(
                f"trial {cfg.name}: every training CAM of epoch {epoch} was all zero: the attention term "
                "did nothing (see the trial's train_cam_zero_fraction)",
                RuntimeWarning,
                stacklevel=2,
            )
        val = evaluate(model, loaders["val"], prep, cfg, table, amp, lam, outside_limit=cfg.outside.subset)
        t_val = time.perf_counter() - t0 - t_train
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "lambda": lam,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"val_{k}": v for k, v in val["metrics"].items()},
        }
        score = metrics[selection]
        scheduler.step(metrics[plateau_on])
        first = progress.best_epoch < 0
        if first or (math.isfinite(score) and sign * score > sign * progress.best_score):
            progress.best_score, progress.best_epoch = score, epoch
            if cfg.train.early_stop == "consecutive":  # "total" (the authors') never resets the count
                progress.stale_epochs = 0
            atomic_save(model_payload(model, cfg, size, epoch, metrics), ckpt_dir / BEST_FILE)
        else:
            progress.stale_epochs += 1
        # training pass, validation pass, and the whole epoch (+ selection and best-model save)
        metrics |= {"epoch_train_s": t_train, "epoch_val_s": t_val, "epoch_time_s": time.perf_counter() - t0}
        progress.history.append(metrics)
        progress.next_epoch = epoch + 1
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, scaler, progress, cfg)
        done = epoch + 1 == cfg.train.epochs or progress.stale_epochs >= cfg.train.early_stop_patience
        # with the best epoch so far (the trial's rule is the one that picks it), and whether this
        # epoch is the last it trains: a scheduler that stopped it now would only skip its test
        yield {**metrics, **_best_so_far(progress), LAST_EPOCH: float(done)}, epoch, ckpt_dir
        if done:
            break

    best = safe_load(ckpt_dir / BEST_FILE, map_location=device)
    model.load_state_dict(best["state_dict"])
    best_row = _best_row(progress)
    test = evaluate(model, loaders["test"], prep, cfg, table, amp, best_row["lambda"], keep_examples=16)
    # the best model's validation predictions too (one more pass): comparisons after the fact
    # (bootstrap intervals, paired tests) need both splits image by image
    val_best = evaluate(model, loaders["val"], prep, cfg, table, amp, best_row["lambda"])
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
    splits = {"val": val_best, "test": test}
    result["predictions_path"] = str(
        write_predictions(out / PREDICTIONS_FILE, cache, cfg.data.classes, splits)
    )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ---- helpers --------------------------------------------------------------------------------------
def _best_row(progress: Progress) -> dict[str, float]:
    return next(h for h in progress.history if int(h["epoch"]) == progress.best_epoch)


def last_report(ckpt_dir: str | Path) -> dict[str, float] | None:
    """What the trial of checkpoint ``ckpt_dir`` reported for its last epoch, or None before any."""
    progress = read_progress(Path(ckpt_dir))
    return {**progress.history[-1], **_best_so_far(progress)} if progress.history else None


def _best_so_far(progress: Progress) -> dict[str, float]:
    """``best_epoch`` and the ``best_val_*`` of the best epoch so far, as the trial selects it."""
    row = _best_row(progress)
    return {
        "best_epoch": progress.best_epoch,
        **{f"best_{k}": v for k, v in row.items() if k.startswith("val_")},
    }


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
    # a training pass reads image, box and label only, unless augmentation moves the masks too, or
    # the outside of the lungs is masked or scored (the outside_mask augmentation, mode input_grad)
    att = cfg.attention
    lungs = cfg.outside.augment > 0 or (att.uses_attention and mode_info(att.mode).input_gradient)
    ds = CacheDataset(cache, split, masks=split != "train" or cfg.data.augment or lungs)
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


def plateau_scheduler(cfg: TrialConfig, optimizer: torch.optim.Optimizer):
    """ReduceLROnPlateau on ``train.plateau_on`` in its direction; returns it and the metric it watches."""
    watched = "val_loss" if cfg.train.plateau_on == "val_loss" else cfg.train.selection_metric
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max" if higher_is_better(watched) else "min",
        factor=cfg.train.plateau_factor,
        patience=cfg.train.plateau_patience,
        min_lr=cfg.train.plateau_min_lr,
    )
    return scheduler, watched


PREDICTIONS_FILE = "predictions.csv"


def write_predictions(
    path: Path, cache: Cache, classes: tuple[str, ...] | list[str], splits: dict[str, dict[str, Any]]
) -> Path:
    """One row per image of each split: ``split, row, label, p_<class>...``, ``row`` its index in
    the cache (the loaders read a split in cache order), probabilities at full precision. It holds
    no patient identifier or path, so it may leave the cluster whatever the data's access level."""
    import csv

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "row", "label", *(f"p_{c}" for c in classes)])
        for split, ev in splits.items():
            rows = cache.split_indices(split)
            if len(rows) != len(ev["y_true"]):
                raise RuntimeError(f"{split}: {len(ev['y_true'])} predictions for {len(rows)} cache rows")
            for r, y, p in zip(rows, ev["y_true"], ev["y_prob"], strict=True):
                w.writerow([split, int(r), int(y), *(repr(float(v)) for v in p)])
    tmp.replace(path)
    return path


def amp_dtype(cfg: TrialConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a trial: bf16 (fp16 where bf16 is missing) on CUDA with ``train.amp``."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
