"""A trial's files on disk: the resumable checkpoint (model, optimizer, scheduler, loop state) and
the best model's payload (weights plus what it takes to rebuild and use it).

Both are written atomically (temporary file, then rename): a crash leaves the previous file.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrialConfig
from .errors import UserError

__all__ = [
    "BEST_FILE",
    "STATE_FILE",
    "CheckpointMismatchError",
    "Progress",
    "atomic_save",
    "floats",
    "load_checkpoint",
    "model_payload",
    "read_progress",
    "safe_load",
    "save_checkpoint",
]

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


class CheckpointMismatchError(UserError):
    """A checkpoint was written for a different backbone, task or image size."""


@dataclass
class Progress:
    """Loop state saved in every checkpoint."""

    next_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float)}


def model_payload(
    model, cfg: TrialConfig, size: int, epoch: int, metrics: dict[str, float]
) -> dict[str, Any]:
    """The best model as saved: weights, backbone, classes, input size and normalisation, config."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": cfg.model.backbone,
        "classes": list(cfg.data.classes),
        "image_size": size,
        "normalization": {"mean": 0.5, "std": 0.5},
        "epoch": epoch,
        "config": cfg.to_dict(),
        "metrics": floats(metrics),
    }


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written file left beside the previous one
        tmp.unlink(missing_ok=True)
        raise


def _identity(cfg: TrialConfig) -> dict[str, Any]:
    return {
        "backbone": cfg.model.backbone,
        "classes": list(cfg.data.classes),
        "image_size": cfg.model.image_size,
    }


def save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, scaler, progress: Progress, cfg) -> None:
    atomic_save(
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


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a checkpoint file that only tensors and plain data may come out of
    (``weights_only``): a file holding anything that would run code is refused, naming it."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatchError(
            f"{path}: holds objects other than tensors and plain data; not loaded, as loading it could "
            f"run code ({first})"
        ) from None


def read_progress(ckpt_dir: Path) -> Progress:
    """The loop state of checkpoint ``ckpt_dir`` alone (tensors only: nothing in it runs code)."""
    f = ckpt_dir / STATE_FILE
    if not f.is_file():
        raise CheckpointMismatchError(f"{ckpt_dir}: not a trial checkpoint (no {STATE_FILE})")
    return Progress(**safe_load(f)["progress"])


def load_checkpoint(ckpt_dir: Path, cfg, model, optimizer, scheduler, scaler, device) -> Progress:
    """Restore model, optimizer, scheduler and scaler from ``ckpt_dir``; return the loop state."""
    f = ckpt_dir / STATE_FILE
    if not f.is_file() or not (ckpt_dir / BEST_FILE).is_file():
        raise CheckpointMismatchError(
            f"{ckpt_dir}: not a trial checkpoint (needs {STATE_FILE} and {BEST_FILE})"
        )
    state = safe_load(f, map_location=device)
    mine, theirs = _identity(cfg), state.get("identity", {})
    if mine != theirs:
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        raise CheckpointMismatchError(f"{f}: written for a different trial (checkpoint, config): {diff}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return Progress(**state["progress"])
