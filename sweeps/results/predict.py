"""Run an exported model on a folder of images: probabilities (CSV) and Grad-CAM overlays (PNG).

Preprocessing is the training one, step by step: decode to grey uint8 and resize to the dataset
cache's size with :mod:`trainer.data.images` (what ``cxr-sweep prepare`` does), then — when the
network's input size differs from the cache's — the bilinear antialiased resize of
:class:`trainer.data.transforms.BatchTransform`, scale to [0, 1], ``(x − mean) / std``, and repeat
to three channels. The sizes and normalisation come from the export's metadata.

Probabilities come from TorchScript or ONNX Runtime (``runtime``). Grad-CAM needs gradients at
the last feature map, which only the TorchScript file carries (its ``features`` and ``head``
methods); :func:`trainer.cam.grad_cam` runs on them, so CAMs equal those of the original model.
The CAM targets each image's predicted class. Outputs are written to a temporary folder and
renamed into place: an unreadable image fails naming the file and leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.images import IMAGE_SUFFIXES, read_gray, resize_gray

from .export import ExportError, staged_folder
from .formats import load_torchscript
from .model_card import META_FILE

__all__ = [
    "Exported",
    "PredictResult",
    "ScriptedBackbone",
    "load_exported",
    "predict_folder",
    "preprocess",
]

RUNTIMES = ("auto", "torchscript", "onnx")


@dataclass
class Exported:
    """An exported model ready to run: its metadata and the files present."""

    meta: dict[str, Any]
    torchscript: Path | None
    onnx: Path | None


@dataclass
class PredictResult:
    out_dir: Path
    csv: Path
    overlays: list[Path]
    names: list[str]
    probs: np.ndarray  # (N, K)
    cams: np.ndarray | None  # (N, S, S) in [0, 1]
    runtime: str


# ---- loading --------------------------------------------------------------------------------------------
def load_exported(path: str | Path) -> Exported:
    """An export folder (``export.json``), a TorchScript ``.pt`` or an ``.onnx`` file."""
    path = Path(path)
    if path.is_dir():
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise ExportError(f"{path}: not an export folder (no {META_FILE}); run `cxr-sweep export` first")
        meta = json.loads(meta_file.read_text())
        files = meta.get("files", {})
        ts = path / files["torchscript"] if "torchscript" in files else None
        ox = path / files["onnx"] if "onnx" in files else None
        for f in (ts, ox):
            if f is not None and not f.is_file():
                raise ExportError(f"{path}: {f.name} listed in {META_FILE} is missing")
        return Exported(meta, ts, ox)
    if not path.is_file():
        raise ExportError(f"--model {path}: no such file or folder")
    if path.suffix == ".onnx":
        return Exported(_onnx_meta(path), None, path)
    extra = {"cxr/meta.json": ""}
    try:
        load_torchscript(path, extra)
    except Exception as e:
        raise ExportError(f"--model {path}: not a TorchScript file from `cxr-sweep export`: {e}") from None
    if not extra["cxr/meta.json"]:
        raise ExportError(
            f"--model {path}: TorchScript file without cxr metadata (not from `cxr-sweep export`)"
        )
    return Exported(json.loads(extra["cxr/meta.json"]), path, None)


def _onnx_meta(path: Path) -> dict[str, Any]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"--model {path}: not an ONNX file: {e}") from None
    meta = {
        p.key.removeprefix("cxr."): json.loads(p.value)
        for p in proto.metadata_props
        if p.key.startswith("cxr.")
    }
    if "classes" not in meta:
        raise ExportError(f"--model {path}: ONNX file without cxr metadata (not from `cxr-sweep export`)")
    return meta


# ---- images ----------------------------------------------------------------------------------------------
OVERLAY_SIZE = 512  # px: overlays are for reading, not the network's input size


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ExportError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_gray(path: Path, size: int) -> np.ndarray:
    """``(size, size)`` uint8 grey, decoded and resized by the same functions that build caches."""
    return resize_gray(read_gray(path), size)


def preprocess(gray: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
    """``(N, S_cache, S_cache)`` uint8 → ``(N, 3, S, S)`` float, exactly as training prepares a batch."""
    size = int(meta["image_size"])
    norm = meta.get("normalization", {"mean": 0.5, "std": 0.5})
    img = torch.from_numpy(gray)[:, None].float().div_(255.0)  # (N, 1, Sc, Sc)
    if img.shape[-1] != size:
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)
    return ((img - norm["mean"]) / norm["std"]).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)


# ---- running ---------------------------------------------------------------------------------------------
class ScriptedBackbone:
    """The TorchScript export seen as the timm interface :func:`trainer.cam.grad_cam` uses."""

    def __init__(self, module, meta: dict[str, Any]) -> None:
        self.module = module
        self.num_features = int(meta.get("num_features", 0)) or None
        self.num_prefix_tokens = int(meta.get("num_prefix_tokens", 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.module.head(feats)


def _onnx_logits(path: Path, x: torch.Tensor, batch: int) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.cat(
        [
            torch.from_numpy(session.run(None, {name: x[i : i + batch].numpy()})[0])
            for i in range(0, len(x), batch)
        ]
    )


def predict_folder(
    model: str | Path,
    images: str | Path,
    out_dir: str | Path,
    *,
    runtime: str = "auto",
    cam: bool = True,
    batch_size: int = 16,
    overwrite: bool = False,
) -> PredictResult:
    """Probabilities for every image under ``images`` → ``predictions.csv``; CAM overlays → ``cam/``."""
    from trainer.cam import grad_cam

    if runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    exported = load_exported(model)
    if runtime == "auto":
        runtime = "torchscript" if exported.torchscript is not None else "onnx"
    if getattr(exported, runtime) is None:
        raise ExportError(f"--runtime {runtime}: {model} holds no {runtime} model")
    if cam and exported.torchscript is None:
        raise ExportError(
            f"--model {model}: Grad-CAM needs gradients at the last feature map, which an ONNX graph does "
            "not carry; pass the export folder or its TorchScript file, or --no-cam for probabilities only"
        )
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    root = Path(images).resolve()
    files = _image_files(root)
    meta = exported.meta
    cache_size = int(meta.get("cache_size") or meta["image_size"])
    x = preprocess(np.stack([_read_gray(f, cache_size) for f in files]), meta)  # (N, 3, S, S)
    names = [str(f.relative_to(root)) for f in files]

    scripted = load_torchscript(exported.torchscript) if exported.torchscript else None
    logits_parts, cam_parts = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if cam:
            with torch.no_grad():
                logits, c = grad_cam(
                    ScriptedBackbone(scripted, meta), xb, "predicted", score=meta.get("cam_score", "logit")
                )  # (B, K), (B, 1, S, S); the CAM the model was trained with
            cam_parts.append(c[:, 0])
        elif runtime == "torchscript":
            with torch.no_grad():
                logits = scripted(xb)
        if runtime == "torchscript":
            logits_parts.append(logits)
    logits = (
        torch.cat(logits_parts) if runtime == "torchscript" else _onnx_logits(exported.onnx, x, batch_size)
    )
    probs = logits.float().softmax(1).numpy()  # (N, K)
    cams = torch.cat(cam_parts).numpy() if cam else None  # (N, S, S)

    with staged_folder(out) as tmp:
        _write_csv(tmp / "predictions.csv", names, probs, meta["classes"])
        overlays = []
        if cams is not None:
            np.savez_compressed(tmp / "cams.npz", names=np.array(names), cams=cams.astype(np.float32))
            size = max(OVERLAY_SIZE, cams.shape[-1])
            for f, name, c, p in zip(files, names, cams, probs, strict=True):
                k = int(p.argmax())
                label = f"{meta['classes'][k]} {p[k]:.2f}"
                gray01 = _read_gray(f, size).astype(np.float32) / 255.0  # the image itself, not the input
                overlays.append(_overlay(gray01, c, label, tmp / "cam" / name))
    overlays = [out / p.relative_to(tmp) for p in overlays]
    return PredictResult(out, out / "predictions.csv", overlays, names, probs, cams, runtime)


def _write_csv(path: Path, names: list[str], probs: np.ndarray, classes: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *(f"p_{c}" for c in classes), "predicted", "confidence"])
        for name, p in zip(names, probs, strict=True):
            k = int(p.argmax())
            w.writerow([name, *(repr(float(v)) for v in p), classes[k], repr(float(p[k]))])


def _overlay(gray01: np.ndarray, cam: np.ndarray, label: str, path: Path) -> Path:
    """The image (at least :data:`OVERLAY_SIZE` px) with its CAM, bilinear-upsampled, in the jet
    colormap at 40 % on top, as the training artifacts show it, and the predicted class with its
    probability written in the top-left corner."""
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    size = gray01.shape[0]
    cam = np.asarray(
        Image.fromarray(np.clip(cam, 0, 1).astype(np.float32)).resize((size, size), Image.BILINEAR)
    )
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]  # (S, S, 3)
    grey = np.clip(gray01, 0, 1)[..., None].repeat(3, axis=2)
    rgb = (0.6 * grey + 0.4 * heat) * 255.0
    image = Image.fromarray(np.round(rgb).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, size // 24))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = max(3, size // 128)
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0))
    draw.text((pad - left, pad - top), label, fill=(255, 255, 255), font=font)
    path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
