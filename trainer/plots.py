"""Run artifacts as PNGs: confusion matrix, ROC curves and a Grad-CAM overlay grid.

matplotlib is imported lazily with the Agg backend (no display on cluster nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["cam_grid_png", "confusion_matrix_png", "roc_png"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    cm = confusion_matrix(y_true, y_prob.argmax(1), labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(classes), 1.2 + 1.2 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def roc_png(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    positives = [1] if len(classes) == 2 else range(len(classes))
    for k in positives:
        t = (y_true == k).astype(int)
        if t.min() == t.max():
            continue
        fpr, tpr, _ = roc_curve(t, y_prob[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUC {roc_auc_score(t, y_prob[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (test)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cam_grid_png(
    examples: dict[str, torch.Tensor], classes: Sequence[str], path: Path, cols: int = 8
) -> Path:
    """Images (normalised, ``(N, 1, H, W)``) with their Grad-CAM overlaid, titled true → predicted."""
    plt = _plt()
    imgs = (examples["image"][:, 0].float() * 0.5 + 0.5).clamp(0, 1).numpy()  # (N, H, W)
    cams = examples["cam"][:, 0].float().numpy()
    n = len(imgs)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
        ax.imshow(cams[i], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        t, p = int(examples["label"][i]), int(examples["pred"][i])
        ax.set_title(f"{classes[t][:10]} → {classes[p][:10]}", fontsize=6, color="green" if t == p else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
