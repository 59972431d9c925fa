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
epoch time it reports (training + validation + the best-checkpoint save, which the model of
the authors' step leaves out: the ratio is conservative). The machine may be shared, so the two
are interleaved: one of our epochs (paper and soft mode in turn) runs before theirs and after
each of their batches, outside their timing; ours is the median of those. An untimed epoch of
ours runs first, so both sides are timed in a warm process (oneDNN kernels and allocator set
up: about 2.5 s of a fresh process's first resnet50 epoch here, 1–2 % of theirs, most of ours).

    python benchmarks/authors_baseline.py --out benchmarks/results/authors_baseline_cpu.json
    python benchmarks/authors_baseline.py --smoke --out /tmp/ab.json     # seconds, for tests
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
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

__all__ = ["ClassicUNet", "authors_epoch", "main"]

CLASSES = ("No Finding", "Effusion")


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
def _read_batch(paths: list[Path], size: int) -> torch.Tensor:
    """Their data loader: decode each PNG, resize, normalise (mean 0.5, std 0.5), grey → 3 channels."""
    arrs = [
        np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR)) for p in paths
    ]
    x = torch.from_numpy(np.stack(arrs)).float().div_(255.0).sub_(0.5).div_(0.5)  # (B, S, S)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()  # (B, 3, S, S)


def _lung_region(unet: nn.Module, path: Path, seg_size: int, size: int, label: int) -> np.ndarray:
    """Segment the image read from its file; the prior region (effusion: lower half of the lung box)."""
    img = np.asarray(Image.open(path).convert("L").resize((seg_size, seg_size)), dtype=np.float32) / 255.0
    with torch.no_grad():
        mask = torch.sigmoid(unet(torch.from_numpy(img)[None, None]))[0, 0].numpy() > 0.5
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

    t = time.perf_counter()
    twin = copy.deepcopy(model)
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
    timing: dict[str, float] = defaultdict(float)
    total = 0.0
    for split, items in (("train", train), ("val", val)):
        model.train(split == "train")
        for k in range(0, len(items), batch):
            t0 = time.perf_counter()
            paths, y = (
                [p for p, _ in items[k : k + batch]],
                torch.tensor([c for _, c in items[k : k + batch]]),
            )
            t = time.perf_counter()
            x = _read_batch(paths, size)
            timing["read_batch"] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.set_grad_enabled(split == "train"):
                logits = model(x)
                ce = F.cross_entropy(logits, y)
            timing["classifier"] += time.perf_counter() - t
            att = _attention_losses(
                model, unet, layer, x, y, logits.argmax(1), paths, seg_size, threshold, timing
            )
            if split == "train":
                t = time.perf_counter()
                loss = lam * ce + (1 - lam) * torch.tensor(att)  # the numpy term: no gradient
                opt.zero_grad()
                loss.backward()
                opt.step()
                timing["classifier"] += time.perf_counter() - t
            total += time.perf_counter() - t0
            if between is not None:
                between()
    return {"epoch_s": total, "parts_s": dict(timing)}


# ---- data and our side -----------------------------------------------------------------------------
def _dataset(work: Path, n_train: int, n_val: int, src_size: int, size: int) -> tuple[list, list, Path]:
    """Phantom PNGs (the authors read these) and our cache of the same images at the training size."""
    n_test = 2
    need = n_train + n_val + n_test
    ph = work / "phantoms"
    generate(ph, n_patients=(need + 1) // 2 + 1, classes=CLASSES, size=src_size, seed=0)
    with open(ph / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in CLASSES]
    by_class = [[r for r in rows if r["label"] == c] for c in CLASSES]
    rows = [r for pair in zip(*by_class, strict=False) for r in pair][:need]  # both classes in every split
    if len(rows) < need:
        raise RuntimeError(f"{ph}: {len(rows)} usable phantom images, need {need}")
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test

    def load(rel: str, mask: bool) -> np.ndarray:
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


def ours_epoch(cache: Path, out: Path, backbone: str, size: int, batch: int, mode: str) -> float:
    """Seconds of epoch 0 of the product's own trial (training + validation), as it reports them."""
    epochs: list[float] = []
    cfg = {
        "name": f"bench-{mode}",
        "output_dir": str(out),
        "data": {"cache": str(cache), "task": "ne"},
        "model": {"backbone": backbone, "image_size": size},
        "train": {"epochs": 1, "batch_size": batch, "lr": 1e-5, "seed": 0, "device": "cpu"},
        "attention": {"lambda": 0.5, "mode": mode, "threshold": 0.5, "cam_target": "predicted"},
    }
    run_trial(cfg, report=lambda m, epoch, ckpt: epochs.append(m["epoch_time_s"]))
    return epochs[0]


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
    args = ap.parse_args(argv)
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
        runs: dict[str, list[float]] = {"paper": [], "soft": []}
        order = iter(["paper", "soft"] * (args.train + args.val))

        def run_ours() -> None:  # ours alternates paper / soft, before theirs and after each batch
            m = next(order)
            runs[m].append(
                ours_epoch(cache, work / f"run-{len(runs[m])}-{m}", args.backbone, args.size, args.batch, m)
            )

        ours_epoch(cache, work / "warm-up", args.backbone, args.size, args.batch, "soft")  # untimed
        run_ours()
        run_ours()
        torch.manual_seed(0)
        model = create_backbone(args.backbone, num_classes=len(CLASSES))
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        unet = ClassicUNet(base=unet_base).eval()
        theirs = authors_epoch(
            model, unet, opt, train, val, args.batch, args.size, args.seg_size, between=run_ours
        )
    ours = {m: statistics.median(v) for m, v in runs.items()}
    n_img = args.train + args.val
    report = {
        "benchmark": "authors_baseline",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu",
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
        "ours_epoch_s": ours,
        "ours_epoch_s_all": runs,
        "ratio_authors_over_ours": {m: theirs["epoch_s"] / s for m, s in ours.items()},
        "target_ratio": 20.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"{args.backbone} {args.size}px, {args.train}+{args.val} images: "
        f"authors {theirs['epoch_s']:.1f} s/epoch "
        f"(U-Net {report['authors_unet_s_per_image']:.2f} s/image); ours paper {ours['paper']:.2f} s, soft "
        f"{ours['soft']:.2f} s; authors ÷ ours: paper {report['ratio_authors_over_ours']['paper']:.1f}x, "
        f"soft {report['ratio_authors_over_ours']['soft']:.1f}x"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
