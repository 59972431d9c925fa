"""Data loading: the dataset cache vs decoding source PNGs every epoch, and prepare throughput.

Source images are NIH-sized stand-ins: phantoms rendered at 256 px, upsampled to 1024 px with
detector-like noise and saved as 8-bit PNGs (about the size and entropy of NIH's files), plus
their lung masks. Then, measured in one run on one machine:

1. ``prepare``: ``build_cache`` with the default lung U-Net (resnet34 encoder at 256 px,
   untrained: speed does not depend on the weights) → images/s;
2. one training epoch's worth of batches through the trainer's own DataLoader
   (``trainer.loop.split_loader``, default loader settings: mask-free training batches) and
   ``BatchTransform``, from the cache, vs the same batches with the lung and lesion masks (the
   loader before it left them out of training batches), vs the same batches from a Dataset that
   decodes and resizes the source PNG and mask each time (what a trainer without a cache does
   every epoch) → ratios;
3. the cache's loading time per batch ÷ the time of one training step (the trainer's
   ``training_step``; plain CE, the cheapest step, so the share is an upper bound) → share.

    python benchmarks/loader.py --out benchmarks/results/loader_cpu.json
    python benchmarks/loader.py --smoke        # seconds, for tests
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.data.cache import CacheDataset, collate_batch, open_cache
from trainer.data.images import read_gray, read_mask, resize_gray, resize_mask
from trainer.data.phantom import synthesize
from trainer.data.prepare import build_cache, plan_splits
from trainer.data.sources import csv_records
from trainer.data.transforms import BatchTransform
from trainer.tasks import classes_for


def make_sources(root: Path, n_patients: int, source_size: int, seed: int = 0) -> Path:
    """NIH-like source PNGs (``source_size`` px) with lung masks and a labels CSV; returns the CSV."""
    ds = synthesize(n_patients, classes_for("ne"), 256, seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "lungs").mkdir(exist_ok=True)

    def write(i: int) -> None:  # PNG encoding releases the GIL: threads use every core
        rng = np.random.default_rng([seed, i])
        big = Image.fromarray(ds.images[i]).resize((source_size, source_size), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 3, (source_size, source_size)).astype(np.int16)
        noisy = np.asarray(big, dtype=np.int16) + noise
        iid = ds.image_ids[i]
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "images" / f"{iid}.png")
        lung = Image.fromarray(ds.lung_masks[i] * np.uint8(255)).resize((source_size, source_size))
        lung.save(root / "lungs" / f"{iid}.png")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, range(len(ds.image_ids))))
    rows = []
    for i, iid in enumerate(ds.image_ids):
        rows.append(
            {
                "image_id": iid,
                "path": f"images/{iid}.png",
                "label": ds.labels[i],
                "patient_id": ds.patient_ids[i],
                "split": ds.splits[i],
                "lung_mask_path": f"lungs/{iid}.png",
            }
        )
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


class SourceDataset(torch.utils.data.Dataset):
    """The same samples as ``CacheDataset``, decoded from the source PNGs on every access."""

    def __init__(self, cache, root: Path, split: str, size: int) -> None:
        self.cache, self.root, self.size = cache, root, size
        self.indices = cache.split_indices(split)
        self.rows = [cache.manifest[i] for i in self.indices]
        lookup = {}
        with open(root / "labels.csv", newline="") as f:
            for r in csv.DictReader(f):
                lookup[r["image_id"]] = r["lung_mask_path"]
        self.lungs = [lookup[r["image_id"]] for r in self.rows]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img = resize_gray(read_gray(self.root / self.rows[i]["source_path"]), self.size)
        lung = resize_mask(read_mask(self.root / self.lungs[i]), self.size)
        box = torch.from_numpy(np.asarray(self.cache.lung_boxes[self.indices[i]], dtype=np.int64))
        return {
            "image": torch.from_numpy(img)[None],
            "lung": torch.from_numpy(lung)[None],
            "box": box,
            "lesion": torch.zeros(1, self.size, self.size, dtype=torch.uint8),
            "lesion_known": torch.tensor(False),
            "label": torch.tensor(int(self.cache.labels[self.indices[i]])),
            "index": torch.tensor(int(self.indices[i])),
        }


def _epoch_time(loader, prep) -> tuple[float, int]:
    t = time.perf_counter()
    batches = 0
    for raw in loader:
        prep(raw)
        batches += 1
    if prep.device.type == "cuda":  # the copies to the device are asynchronous
        torch.cuda.synchronize(prep.device)
    return time.perf_counter() - t, batches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--source-size", type=int, default=1024)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.smoke:
        args.patients, args.source_size, args.size, args.backbone, args.repeats = 6, 128, 64, "test_resnet", 1
        args.batch_size = 4
    torch.manual_seed(0)
    from trainer.config import TrialConfig
    from trainer.loop import split_loader
    from trainer.segmenter import Segmenter, SegmenterMeta, build_unet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sources"
        t0 = time.perf_counter()
        labels = make_sources(root, args.patients, args.source_size)
        make_s = time.perf_counter() - t0
        records, _ = csv_records(labels, "ne")
        for r in records:  # prepare must segment: the U-Net's cost is part of the throughput
            r.lung_mask_path = None
        kept, _ = plan_splits(records, classes_for("ne"), balance=False)
        meta = (
            SegmenterMeta()
            if not args.smoke
            else SegmenterMeta(
                encoder="resnet18", encoder_depth=3, decoder_channels=(16, 16, 16), input_size=64
            )
        )
        seg = Segmenter(build_unet(meta), meta, None, args.device)
        cache_dir = Path(tmp) / "cache"
        t0 = time.perf_counter()
        build_cache(
            kept,
            cache_dir,
            root=root,
            classes=classes_for("ne"),
            task="ne",
            size=args.size,
            source="bench",
            data_access="synthetic",
            segmenter=seg,
        )
        prepare_s = time.perf_counter() - t0
        cache = open_cache(cache_dir)
        cfg = TrialConfig.from_dict(
            {
                "data": {"cache": str(cache_dir), "task": "ne"},
                "model": {"backbone": args.backbone},
                "train": {"batch_size": args.batch_size},
            },
        )
        device = torch.device(args.device)
        cuda = device.type == "cuda"  # the trainer's CUDA defaults: channels_last batches, bf16 steps
        prep = BatchTransform(device, size=args.size, channels_last=cuda and cfg.train.channels_last)
        cached_loader = split_loader(cache, "train", cfg, device)  # mask-free training batches
        with_masks = torch.utils.data.DataLoader(  # the same with the masks: the loader before
            CacheDataset(cache, "train", masks=True),
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=collate_batch,
            num_workers=cfg.data.num_workers,
            pin_memory=cuda,
        )
        src_ds = SourceDataset(cache, root, "train", args.size)
        source_loader = torch.utils.data.DataLoader(
            src_ds, batch_size=args.batch_size, shuffle=True, num_workers=cfg.data.num_workers
        )
        cached, cached_masks, source = [], [], []
        for _ in range(args.repeats):  # interleaved: load drifts hit all alike
            cached.append(_epoch_time(cached_loader, prep))
            cached_masks.append(_epoch_time(with_masks, prep))
            source.append(_epoch_time(source_loader, prep))
        n_batches = cached[0][1]
        t_cache = statistics.median(t for t, _ in cached)
        t_masks = statistics.median(t for t, _ in cached_masks)
        t_source = statistics.median(t for t, _ in source)
        step_s = _step_time(cfg, cache, prep(next(iter(cached_loader))), args, device)
    per_batch = t_cache / n_batches
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if cuda else args.device,
        },
        "setup": {
            "images": len(kept),
            "train_images": len(src_ds),
            "source_size": args.source_size,
            "cache_size": args.size,
            "batch_size": args.batch_size,
            "num_workers": cfg.data.num_workers,
            "pin_memory": cuda,
            "step": "CE, bf16 autocast, channels_last" if cuda else "CE, fp32",
            "backbone": args.backbone,
            "repeats": args.repeats,
            "segmenter": seg.name,
        },
        "prepare_images_per_s": round(len(kept) / prepare_s, 2),
        "prepare_s": round(prepare_s, 2),
        "source_generation_s": round(make_s, 2),
        "epoch_load_s": {
            "cache": round(t_cache, 4),
            "cache_with_masks": round(t_masks, 4),
            "source_png": round(t_source, 4),
        },
        "mask_free_speedup": round(t_masks / t_cache, 2),
        "cache_speedup": round(t_source / t_cache, 1),
        "load_per_batch_s": round(per_batch, 5),
        "train_step_s": round(step_s, 4),
        "load_share_of_step": round(per_batch / (per_batch + step_s), 4),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _step_time(cfg, cache, b: dict[str, torch.Tensor], args, device) -> float:
    """Median time of the trainer's CE training step on one batch of the cache (its CUDA defaults)."""
    from trainer.backbones import create_backbone
    from trainer.epoch import training_step
    from trainer.loop import amp_dtype
    from trainer.priors import prior_table

    model = create_backbone(args.backbone, num_classes=2).to(device).train()
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = amp_dtype(cfg, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(enabled=False)
    table = prior_table(cache.classes, cfg.attention.priors)
    times = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        training_step(model, b["image"], b["label"], b["box"], opt, scaler, cfg.attention, 1.0, table, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


if __name__ == "__main__":
    main()
