"""The lung segmenter: a segmentation-models-pytorch U-Net, its training, checkpoint and inference.

It runs once per image while a dataset cache is prepared (never during a trial). A checkpoint
is one ``.pt`` file holding the weights and the metadata inference must agree with: input
size, encoder, decoder, normalisation, threshold, validation Dice. Post-processing keeps the
two largest connected components (the lungs), fills holes, and takes the union lung box; an
image where nothing is found gets the whole image as its box (counted by the caller).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

__all__ = [
    "CHECKPOINT_FORMAT",
    "Segmenter",
    "SegmenterError",
    "SegmenterMeta",
    "build_unet",
    "dice_score",
    "load_segmenter",
    "postprocess",
    "train_segmenter",
]

CHECKPOINT_FORMAT = "cxr-lung-unet/1"


class SegmenterError(UserError):
    """A bad segmenter checkpoint, a mismatch with what the caller expects, or unusable training data."""


@dataclass
class SegmenterMeta:
    """Everything inference needs to reproduce training's preprocessing (stored in the checkpoint)."""

    encoder: str = "resnet34"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    input_size: int = 256
    mean: float = 0.5
    std: float = 0.5
    threshold: float = 0.5
    val_dice: float = float("nan")
    epochs: int = 0
    n_train: int = 0
    n_val: int = 0
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def build_unet(meta: SegmenterMeta, encoder_weights: str | None = None) -> torch.nn.Module:
    """A 1-channel-in, 1-logit-out U-Net. ``encoder_weights`` is a local ``.pt``/``.pth`` file or None."""
    import segmentation_models_pytorch as smp

    if len(meta.decoder_channels) != meta.encoder_depth:
        raise SegmenterError(
            f"decoder_channels {list(meta.decoder_channels)} must have "
            f"encoder_depth={meta.encoder_depth} entries"
        )
    try:
        model = smp.Unet(
            encoder_name=meta.encoder,
            encoder_weights=None,  # never download: local files only
            encoder_depth=meta.encoder_depth,
            decoder_channels=tuple(meta.decoder_channels),
            in_channels=1,
            classes=1,
        )
    except (KeyError, ValueError, RuntimeError) as e:
        raise SegmenterError(f"cannot build a U-Net with encoder {meta.encoder!r}: {e}") from None
    if encoder_weights:
        _load_encoder_weights(model, Path(encoder_weights))
    return model


def _load_encoder_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ImageNet-style encoder weights from a local file (3-channel stems are summed to 1)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise SegmenterError(f"{path}: cannot read encoder weights: {e}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.encoder.state_dict()
    for k, v in list(state.items()):
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            state[k] = v.sum(dim=1, keepdim=True)
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise SegmenterError(f"{path}: no tensor matches the {type(model.encoder).__name__} encoder")
    torch.nn.Module.load_state_dict(model.encoder, fits, strict=False)  # smp's override drops the result


def dice_score(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image Dice ``(B,)`` of {0, 1} masks ``(B, 1, H, W)``; two empty masks score 1."""
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    inter = (p * t).sum(1)
    return (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


# ---- post-processing ----------------------------------------------------------------------------
def postprocess(prob: np.ndarray, threshold: float = 0.5, min_area: float = 0.005) -> np.ndarray:
    """Threshold, keep the two largest components (each ≥ ``min_area`` of the image), fill holes.

    ``prob`` ``(H, W)`` float in [0, 1] → ``(H, W)`` uint8 in {0, 1} (all zero when nothing is found).
    """
    from scipy import ndimage

    mask = prob > threshold
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(prob.shape, dtype=np.uint8)
    areas = np.bincount(lab.ravel())[1:]  # (n,)
    keep = np.argsort(areas)[::-1][:2]
    keep = keep[areas[keep] >= min_area * prob.size]
    out = np.isin(lab, keep + 1)
    return ndimage.binary_fill_holes(out).astype(np.uint8)


# ---- inference ----------------------------------------------------------------------------------
class Segmenter:
    """A loaded lung U-Net: ``predict`` takes grey uint8 images of any size and returns masks."""

    def __init__(self, model: torch.nn.Module, meta: SegmenterMeta, path: Path | None, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.meta = meta
        self.path = path
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        where = str(self.path) if self.path else "in-memory"
        return f"unet:{self.meta.encoder}@{self.meta.input_size}px ({where})"

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(B, S, S)`` uint8 images (one size) → ``(B, S, S)`` float32 lung probability."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device)[:, None].float().div_(255.0)
        s = x.shape[-1]
        n = self.meta.input_size
        if s != n:
            x = F.interpolate(x, size=(n, n), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.meta.mean) / self.meta.std  # (B, 1, n, n)
        prob = torch.sigmoid(self.model(x))  # (B, 1, n, n)
        if s != n:
            prob = F.interpolate(prob, size=(s, s), mode="bilinear", align_corners=False)
        return prob[:, 0].float().cpu().numpy()

    def masks_at_own_size(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Post-processed lung masks of grey uint8 images of any sizes, each at its own size.

        Each image is resized to the U-Net's input (as caches resize), and its probability map
        back to the image's size (bilinear) before the threshold and the clean-up.
        """
        from PIL import Image

        from .data.images import resize_gray

        n = self.meta.input_size
        prob = self.probabilities(np.stack([resize_gray(img, n) for img in images]))  # (B, n, n)
        masks = []
        for img, p in zip(images, prob, strict=True):
            h, w = img.shape
            full = np.asarray(Image.fromarray(p).resize((w, h), Image.Resampling.BILINEAR))  # (H, W)
            masks.append(postprocess(full, self.meta.threshold))
        return masks

    def predict(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """``(B, S, S)`` uint8 grey images → post-processed ``(B, S, S)`` uint8 lung masks."""
        out = np.zeros(images.shape, dtype=np.uint8)
        for i in range(0, len(images), batch_size):
            prob = self.probabilities(images[i : i + batch_size])
            for j, p in enumerate(prob):
                out[i + j] = postprocess(p, self.meta.threshold)
        return out


def _select_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_segmenter(
    path: str | Path,
    *,
    device: str = "auto",
    expect_input_size: int | None = None,
    expect_encoder: str | None = None,
) -> Segmenter:
    """Load a checkpoint written by :func:`train_segmenter`; mismatches raise :class:`SegmenterError`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a user's file: no code may run
    except FileNotFoundError:
        raise SegmenterError(f"{path}: segmenter checkpoint not found") from None
    except Exception as e:  # torch raises many types for garbage files
        raise SegmenterError(
            f"{path}: not a readable segmenter checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SegmenterError(
            f"{path}: not a lung-segmenter checkpoint (format {CHECKPOINT_FORMAT!r}); "
            "train one with `cxr-sweep segmenter train`"
        )
    meta_d = dict(ckpt["meta"])
    meta_d["decoder_channels"] = tuple(meta_d["decoder_channels"])
    meta = SegmenterMeta(**meta_d)
    if expect_input_size is not None and expect_input_size != meta.input_size:
        raise SegmenterError(
            f"{path}: trained at input size {meta.input_size} px, but {expect_input_size} px was asked for"
        )
    if expect_encoder is not None and expect_encoder != meta.encoder:
        raise SegmenterError(f"{path}: encoder is {meta.encoder!r}, but {expect_encoder!r} was asked for")
    model = build_unet(meta)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise SegmenterError(
            f"{path}: weights do not fit a U-Net with encoder {meta.encoder!r} "
            f"(depth {meta.encoder_depth}, decoder {list(meta.decoder_channels)}): {' '.join(first)}"
        ) from None
    return Segmenter(model, meta, path, _select_device(device))


def _save(path: Path, model: torch.nn.Module, meta: SegmenterMeta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta_d = asdict(meta)
    meta_d["decoder_channels"] = list(meta.decoder_channels)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "meta": meta_d, "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written file left
        tmp.unlink(missing_ok=True)
        raise


# ---- training -----------------------------------------------------------------------------------
def train_segmenter(
    images: np.ndarray,
    masks: np.ndarray,
    out: str | Path,
    *,
    meta: SegmenterMeta | None = None,
    epochs: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    val_fraction: float = 0.15,
    seed: int = 0,
    device: str = "auto",
    encoder_weights: str | None = None,
    augment: bool = True,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> Segmenter:
    """Train on ``(N, S, S)`` uint8 images and {0, 1} masks (already at ``meta.input_size``).

    Loss = soft Dice + BCE; the epoch with the best validation Dice is kept and saved to
    ``out`` with its metadata. ``progress(epoch, {"loss", "val_dice"})`` is called per epoch.
    """
    meta = meta or SegmenterMeta()
    n = len(images)
    if n < 2:
        raise SegmenterError(f"need at least 2 image/mask pairs to train and validate, got {n}")
    if images.shape != masks.shape or images.shape[1:] != (meta.input_size, meta.input_size):
        raise SegmenterError(
            f"images {images.shape} and masks {masks.shape} must both be "
            f"(N, {meta.input_size}, {meta.input_size})"
        )
    dev = torch.device(_select_device(device))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(n, generator=gen).numpy()
    n_val = min(n - 1, max(1, math.ceil(val_fraction * n)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_all = torch.from_numpy(np.ascontiguousarray(images))[:, None]  # (N, 1, S, S) uint8
    y_all = torch.from_numpy(np.ascontiguousarray(masks > 0).astype(np.uint8))[:, None]

    def prep(x: torch.Tensor) -> torch.Tensor:
        return (x.to(dev).float() / 255.0 - meta.mean) / meta.std

    model = build_unet(meta, encoder_weights).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    aug = _augmentation() if augment else None
    best = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = np.sort(order[i : i + batch_size])
            x, y = x_all[idx].to(dev).float() / 255.0, y_all[idx].to(dev).float()  # (B, 1, S, S)
            if aug is not None:
                x, y = aug(x, y)
                y = (y > 0.5).float()
            logits = model((x - meta.mean) / meta.std)  # (B, 1, S, S)
            loss = _dice_bce(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        sched.step()
        val = _evaluate(model, x_all[val_idx], y_all[val_idx], prep, meta.threshold, batch_size)
        if val > best:
            best, best_epoch = val, epoch + 1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if progress is not None:
            progress(epoch + 1, {"loss": total / max(1, seen), "val_dice": val})
    assert best_state is not None
    model.load_state_dict(best_state)
    meta = SegmenterMeta(
        **{
            **asdict(meta),
            "val_dice": best,
            "epochs": best_epoch,
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
    )
    out = Path(out)
    _save(out, model, meta)
    return Segmenter(model, meta, out, str(dev))


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).flatten(1).sum(1)
    soft_dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)  # (B,)
    return soft_dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


@torch.no_grad()
def _evaluate(model, x: torch.Tensor, y: torch.Tensor, prep, threshold: float, batch_size: int) -> float:
    """Mean Dice of the thresholded prediction over a held-out set (no post-processing)."""
    model.eval()
    scores = []
    for i in range(0, len(x), batch_size):
        prob = torch.sigmoid(model(prep(x[i : i + batch_size])))
        scores.append(dice_score(prob > threshold, y[i : i + batch_size].to(prob.device)).cpu())
    return float(torch.cat(scores).mean())


def _augmentation():
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomAffine(degrees=8.0, translate=(0.06, 0.06), scale=(0.9, 1.1), p=0.9),
        K.ColorJiggle(brightness=0.15, contrast=0.15, p=0.5),
        data_keys=["input", "mask"],
    )


def load_pairs_resized(
    pairs: Sequence[tuple[str, Path, Sequence[Path]]], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(stem, image, [mask files])`` pairs at ``size``: masks of one image are united."""
    from .data.images import read_gray, read_mask, resize_gray, resize_mask

    images = np.zeros((len(pairs), size, size), dtype=np.uint8)
    masks = np.zeros((len(pairs), size, size), dtype=np.uint8)
    for i, (_, img_path, mask_paths) in enumerate(pairs):
        img = read_gray(img_path)
        union = np.zeros(img.shape, dtype=np.uint8)
        for mp in mask_paths:
            m = read_mask(mp)
            if m.shape != img.shape:  # some sets store masks at another resolution
                m = _resize_to(m, img.shape)
            union |= m
        images[i] = resize_gray(img, size)
        masks[i] = resize_mask(union, size)
    return images, masks


def _resize_to(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(mask * np.uint8(255)).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return (np.asarray(im) > 127).astype(np.uint8)
