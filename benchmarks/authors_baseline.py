"""Time per epoch of the authors' training scheme vs ours: same backbone, images and device.

The authors' public code is not vendored here; this is a faithful *cost model* of its training
step, built from the operations it performs (DESIGN.md §1):

* per batch: the classifier batch is read from the PNG files, and the model is deep-copied;
* per image: the image is read from its file again, resized to 512 px and segmented by a
  classic U-Net (64 → 1024 channels, Ronneberger et al.) to get the lung box; a
  pytorch-grad-cam ``GradCAM`` call on the model copy gives the CAM; the attention loss is
  computed from numpy arrays (so it carries no gradient: the update is λ·∇CE);
* every epoch, the same attention loss again on every validation image.

The U-Net has random weights: its cost does not depend on them (its masks only pick a box).
Ours is the product itself: ``trainer.run_trial`` for one epoch on a dataset cache made once
from the same images (segmentation done at ``prepare`` time, as the product does), and the
times it reports: its training + validation passes (``epoch_train_s + epoch_val_s``, what the
authors' epoch above covers) and its whole epoch (``epoch_time_s``: those plus model selection
and the best-checkpoint save, which the model of the authors' step leaves out: the
conservative ratio). The machine may be shared, so the two are interleaved: one of our epochs
(our variants in turn) runs before theirs and after each of their batches, outside their
timing; ours is the median of those. An untimed epoch of
each of our variants runs first, so both sides are timed in a warm process (oneDNN kernels and allocator set
up: about 2.5 s of a fresh process's first resnet50 epoch here, 1–2 % of theirs, most of ours).

    python benchmarks/authors_baseline.py --out benchmarks/results/authors_baseline_cpu.json
    python benchmarks/authors_baseline.py --smoke --out /tmp/ab.json     # seconds, for tests
    python benchmarks/authors_baseline.py --device cuda --train 256 --val 128 --batch 32 \
        --out benchmarks/results/authors_baseline_gpu.json

On CUDA their classifier, U-Net and GradCAM run on the device in float32 (their code has no
mixed precision); ours runs with the trainer's CUDA defaults (bf16 autocast, channels_last) in
``paper`` and ``soft`` mode, in ``soft`` with ``train.amp: false`` (``soft_fp32``) so the
share of the gap that bf16 buys is measured too, and in ``soft`` with
``train.compile_attention: true`` (``soft_fused``; its compilation falls in the untimed
warm-up). Every timed part of theirs is bracketed by a device synchronisation.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trainer import run_trial
from trainer.backbones import create_backbone
from trainer.data.cache import write_cache
from trainer.data.phantom import generate
from trainer.tasks import classes_for

__all__ = ["ClassicUNet", "authors_epoch", "main"]

CLASSES = classes_for("ne")


class ClassicUNet(nn.Module):
    """The original U-Net: four 2× down/up levels, ``base`` → 16·``base`` channels (64 → 1024)."""

    def __init__(self, in_ch: int = 1, out_ch: int = 1, base: int = 64) -> None:
        super().__init__()
        chs = [base * 2**i for i in range(5)]  # 64, 128, 256, 512, 1024
        self.down = nn.ModuleList([_double_conv(in_ch, chs[0])])
        self.down.extend(_double_conv(a, b) for a, b in itertools.pairwise(chs))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in itertools.pairwise(chs))
        self.merge = nn.ModuleList(_double_conv(2 * a, a) for a in chs[:-1])
        self.out = nn.Conv2d(chs[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(reversed(self.up), reversed(self.merge), strict=True):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)


def _double_conv(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(a, b, 3, padding=1, bias=False),
        nn.BatchNorm2d(b),
        nn.ReLU(inplace=True),
        nn.Conv2d(b, b, 3, padding=1, bias=False),
        nn.BatchNorm2d(b),
        nn.ReLU(inplace=True),
    )


# ---- the authors' scheme ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_batch(paths: list[Path], size: int, device: torch.device) -> torch.Tensor:
    """Their data loader: decode each PNG, resize, normalise (mean 0.5, std 0.5), grey → 3 channels."""
    arrs = [
        np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR)) for p in paths
    ]
    x = torch.from_numpy(np.stack(arrs)).float().div_(255.0).sub_(0.5).div_(0.5)  # (B, S, S)
    return x[:, None].expand(-1, 3, -1, -1).contiguous().to(device)  # (B, 3, S, S)


def _lung_region(unet: nn.Module, path: Path, seg_size: int, size: int, label: int) -> np.ndarray:
    """Segment the image read from its file; the prior region (effusion: lower half of the lung box)."""
    img = np.asarray(Image.open(path).convert("L").resize((seg_size, seg_size)), dtype=np.float32) / 255.0
    dev = next(unet.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(img)[None, None].to(dev)
        mask = torch.sigmoid(unet(x))[0, 0].cpu().numpy() > 0.5
    rows, cols = np.where(mask)
    if len(rows) == 0:  # no lung found: the whole image is the box
        y0, y1, x0, x1 = 0, seg_size, 0, seg_size
    else:
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    s = size / seg_size
    region = np.zeros((size, size), dtype=bool)
    if label != 0:
        region[int((y0 + y1) / 2 * s) : int(y1 * s), int(x0 * s) : int(x1 * s)] = True
    return region


def _attention_losses(model, unet, layer_name, x, y, preds, paths, seg_size, threshold, timing) -> float:
    """Per batch: a model copy; per image: U-Net on the file, GradCAM on the copy, numpy loss."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    dev = x.device
    _sync(dev)
    t = time.perf_counter()
    twin = copy.deepcopy(model)
    _sync(dev)
    timing["deepcopy"] += time.perf_counter() - t
    losses = []
    with GradCAM(model=twin, target_layers=[twin.get_submodule(layer_name)]) as cam:
        for i, path in enumerate(paths):
            t = time.perf_counter()
            region = _lung_region(unet, path, seg_size, x.shape[-1], int(y[i]))
            t1 = time.perf_counter()
            heat = cam(input_tensor=x[i : i + 1], targets=[ClassifierOutputTarget(int(preds[i]))])[0]
            t2 = time.perf_counter()
            area = region.sum()
            losses.append(1.0 - float(((heat > threshold) & region).sum()) / area if area else 0.0)
            timing["unet"] += t1 - t
            timing["gradcam"] += t2 - t1
    return float(np.mean(losses))


def authors_epoch(
    model, unet, opt, train, val, batch, size, seg_size, lam=0.5, threshold=0.5, between=None
) -> dict:
    """One epoch (training + validation) of the authors' scheme; seconds, total and per part.

    ``between()`` runs after each batch, outside the timing (the benchmark interleaves ours there).
    """
    layer = model.feature_info[-1]["module"]  # the last feature block, GradCAM's target layer
    dev = next(model.parameters()).device
    timing: dict[str, float] = defaultdict(float)
    total = 0.0
    for split, items in (("train", train), ("val", val)):
        model.train(split == "train")
        for k in range(0, len(items), batch):
            _sync(dev)
            t0 = time.perf_counter()
            paths, y = (
                [p for p, _ in items[k : k + batch]],
                torch.tensor([c for _, c in items[k : k + batch]], device=dev),
            )
            t = time.perf_counter()
            x = _read_batch(paths, size, dev)
            _sync(dev)
            timing["read_batch"] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.set_grad_enabled(split == "train"):
                logits = model(x)
                ce = F.cross_entropy(logits, y)
            _sync(dev)
            timing["classifier"] += time.perf_counter() - t
            att = _attention_losses(
                model, unet, layer, x, y, logits.argmax(1), paths, seg_size, threshold, timing
            )
            if split == "train":
                t = time.perf_counter()
                loss = lam * ce + (1 - lam) * torch.tensor(att, device=dev)  # the numpy term: no gradient
                opt.zero_grad()
                loss.backward()
                opt.step()
                _sync(dev)
                timing["classifier"] += time.perf_counter() - t
            _sync(dev)
            total += time.perf_counter() - t0
            if between is not None:
                between()
    return {"epoch_s": total, "parts_s": dict(timing)}


# ---- data and our side -----------------------------------------------------------------------------
def _phantoms(root: Path, n_patients: int, size: int, per_chunk: int = 12) -> list[dict]:
    """Phantom PNGs rendered in parallel chunks (one seed each); rows with paths relative to ``root``.

    Rendering costs ~0.14 s per 512 px image on one core; chunks use every core. Ids carry the
    chunk so they stay unique across chunks.
    """
    chunks = [min(per_chunk, n_patients - k) for k in range(0, n_patients, per_chunk)]
    with ProcessPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1)) as pool:
        done = [
            pool.submit(generate, root / f"c{i}", n_patients=n, classes=CLASSES, size=size, seed=i)
            for i, n in enumerate(chunks)
        ]
        wait(done)
    rows = []
    for i, fut in enumerate(done):
        with open(fut.result(), newline="") as f:
            for r in csv.DictReader(f):
                if r["label"] not in CLASSES:
                    continue
                r["image_id"], r["patient_id"] = f"c{i}-{r['image_id']}", f"c{i}-{r['patient_id']}"
                for key in ("path", "lung_mask_path", "lesion_mask_path"):
                    r[key] = f"c{i}/{r[key]}"
                rows.append(r)
    return rows


def _dataset(work: Path, n_train: int, n_val: int, src_size: int, size: int) -> tuple[list, list, Path]:
    """Phantom PNGs (the authors read these) and our cache of the same images at the training size."""
    n_test = 2
    need = n_train + n_val + n_test
    ph = work / "phantoms"
    rows = _phantoms(ph, n_patients=(need + 1) // 2 + 1, size=src_size)
    by_class = [[r for r in rows if r["label"] == c] for c in CLASSES]
    rows = [r for pair in zip(*by_class, strict=False) for r in pair][:need]  # both classes in every split
    if len(rows) < need:
        raise RuntimeError(f"{ph}: {len(rows)} usable phantom images, need {need}")
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test

    def load(rel: str, mask: bool) -> np.ndarray:  # rel: relative to ``ph``
        im = Image.open(ph / rel).convert("L").resize((size, size), Image.Resampling.BOX)
        return (np.asarray(im) >= 128).astype(np.uint8) if mask else np.asarray(im, dtype=np.uint8)

    cache = write_cache(
        work / "cache",
        images=np.stack([load(r["path"], False) for r in rows]),
        lung_masks=np.stack([load(r["lung_mask_path"], True) for r in rows]),
        lesion_masks=np.stack([load(r["lesion_mask_path"], True) for r in rows]),
        manifest=[
            {
                "image_id": r["image_id"],
                "patient_id": r["patient_id"],
                "label": r["label"],
                "split": s,
                "source_path": r["path"],
            }
            for r, s in zip(rows, splits, strict=True)
        ],
        classes=CLASSES,
        task="ne",
        source=f"phantoms:{ph}",
        segmenter="ground-truth (phantom lung masks)",
        data_access="synthetic",
    )
    items = [(ph / r["path"], CLASSES.index(r["label"])) for r in rows]
    return items[:n_train], items[n_train : n_train + n_val], cache


# our variants: attention mode, the trainer's CUDA mixed precision, train.compile_attention
OURS = {
    "paper": ("paper", True, False),
    "soft": ("soft", True, False),
    "soft_fp32": ("soft", False, False),
    "soft_fused": ("soft", True, True),
}
GPU_VARIANTS = ["paper", "soft", "soft_fp32", "soft_fused"]


def ours_epoch(
    cache: Path, out: Path, backbone: str, size: int, batch: int, variant: str, device: str = "cpu"
) -> tuple[float, float]:
    """Epoch 0 of the product's own trial, as it reports it: (training + validation passes, whole
    epoch: those plus model selection and the best-checkpoint save), seconds."""
    mode, amp, fused = OURS[variant]
    epochs: list[dict] = []
    cfg = {
        "name": f"bench-{variant}",
        "output_dir": str(out),
        "data": {"cache": str(cache), "task": "ne"},
        "model": {"backbone": backbone, "image_size": size},
        "train": {
            "epochs": 1,
            "batch_size": batch,
            "lr": 1e-5,
            "seed": 0,
            "device": device,
            "amp": amp,
            "compile_attention": fused,
        },
        "attention": {"lambda": 0.5, "mode": mode, "threshold": 0.5, "cam_target": "predicted"},
    }
    run_trial(cfg, report=lambda m, epoch, ckpt: epochs.append(m))
    return epochs[0]["epoch_train_s"] + epochs[0]["epoch_val_s"], epochs[0]["epoch_time_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/authors_baseline_cpu.json"))
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--train", type=int, default=8, help="training images")
    ap.add_argument("--val", type=int, default=4, help="validation images")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224, help="classifier input size")
    ap.add_argument("--seg-size", type=int, default=512, help="the authors' U-Net input size")
    ap.add_argument("--smoke", action="store_true", help="tiny model, U-Net and images: seconds")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]: both schemes run there")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads:  # 1 keeps ratios stable on a machine shared with other jobs (no OpenMP spin-waits)
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.backbone, args.train, args.val, args.batch, args.size, args.seg_size = (
            "test_resnet",
            2,
            2,
            2,
            64,
            64,
        )
    unet_base = 8 if args.smoke else 64
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="authors-baseline-") as tmp:
        work = Path(tmp)
        train, val, cache = _dataset(work, args.train, args.val, max(args.seg_size, args.size), args.size)
        variants = GPU_VARIANTS if device.type == "cuda" else ["paper", "soft"]
        runs: dict[str, list[float]] = {v: [] for v in variants}  # whole epochs
        runs_tv: dict[str, list[float]] = {v: [] for v in variants}  # training + validation passes
        order = itertools.cycle(variants)

        def run_ours() -> None:  # ours cycles through its variants, before theirs and after each batch
            m = next(order)
            out = work / f"run-{len(runs[m])}-{m}"
            tv, whole = ours_epoch(cache, out, args.backbone, args.size, args.batch, m, args.device)
            runs_tv[m].append(tv)
            runs[m].append(whole)

        for v in variants:  # untimed warm-up (kernels, allocator, cuDNN autotuning)
            ours_epoch(cache, work / f"warm-up-{v}", args.backbone, args.size, args.batch, v, args.device)
        for _ in variants:
            run_ours()
        torch.manual_seed(0)
        model = create_backbone(args.backbone, num_classes=len(CLASSES)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        unet = ClassicUNet(base=unet_base).to(device).eval()
        theirs = authors_epoch(
            model, unet, opt, train, val, args.batch, args.size, args.seg_size, between=run_ours
        )
    ours = {m: statistics.median(v) for m, v in runs.items()}
    ours_tv = {m: statistics.median(v) for m, v in runs_tv.items()}
    n_img = args.train + args.val
    report = {
        "benchmark": "authors_baseline",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backbone": args.backbone,
        "image_size": args.size,
        "unet_input_size": args.seg_size,
        "unet_channels": [unet_base * 2**i for i in range(5)],
        "train_images": args.train,
        "val_images": args.val,
        "batch": args.batch,
        "authors_epoch_s": theirs["epoch_s"],
        "authors_parts_s": theirs["parts_s"],
        "authors_unet_s_per_image": theirs["parts_s"]["unet"] / n_img,
        "ours_amp": {v: OURS[v][1] and device.type == "cuda" for v in variants},
        "ours_compile_attention": {v: OURS[v][2] and device.type == "cuda" for v in variants},
        "authors_precision": "fp32",
        "ours_train_val_s": ours_tv,
        "ours_train_val_s_all": runs_tv,
        "ours_epoch_s": ours,
        "ours_epoch_s_all": runs,
        "ratio_authors_over_ours": {m: theirs["epoch_s"] / s for m, s in ours.items()},
        "ratio_authors_over_ours_train_val": {m: theirs["epoch_s"] / s for m, s in ours_tv.items()},
        "target_ratio": 50.0 if device.type == "cuda" else 20.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"{args.backbone} {args.size}px, {args.train}+{args.val} images: "
        f"authors {theirs['epoch_s']:.1f} s/epoch "
        f"(U-Net {report['authors_unet_s_per_image']:.3f} s/image); ours "
        + ", ".join(f"{v} {s:.2f} s" for v, s in ours.items())
        + "; authors ÷ ours (whole epoch / train + val): "
        + ", ".join(
            f"{v} {r:.1f}x / {report['ratio_authors_over_ours_train_val'][v]:.1f}x"
            for v, r in report["ratio_authors_over_ours"].items()
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
