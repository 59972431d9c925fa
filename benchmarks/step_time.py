"""Attention-loss training step ÷ cross-entropy step, side by side on the same model and batch.

Both steps are the product's own :func:`trainer.loop.training_step` (λ = 1 is the plain CE
path, no CAM); the attention steps run λ = 0.5 in ``soft`` (double-backward through the head)
and ``paper`` (no gradient through the CAM) modes. Steps are interleaved — CE, soft, paper,
CE, ... — so drift in machine load hits all three alike; the median of each is reported.

    python benchmarks/step_time.py --out benchmarks/results/step_time_cpu.json
    python benchmarks/step_time.py --smoke          # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from trainer.backbones import create_backbone
from trainer.config import AttentionConfig
from trainer.loop import training_step
from trainer.priors import DEFAULT_PRIORS, prior_table

CPU_CASES = [  # (backbone, image size, batch)
    ("resnet18", 128, 8),
    ("resnet50", 224, 2),
    ("vgg16", 224, 2),
    ("pvt_v2_b2_li", 224, 2),
]
SMOKE_CASES = [("test_resnet", 64, 4)]
CLASSES = ("No Finding", "Effusion")


def bench_case(name: str, size: int, batch: int, repeats: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=2).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = torch.randn(batch, 3, size, size, device=device)  # (B, 3, S, S)
    y = torch.arange(batch, device=device) % 2  # half No Finding, half Effusion
    box = torch.tensor([[size // 8, size // 8, 3 * size // 4, 3 * size // 4]] * batch, device=device)
    table = prior_table(CLASSES, DEFAULT_PRIORS).to(device)
    kinds = {
        "ce": (AttentionConfig(**{"lambda": 1.0}), 1.0),
        "soft": (AttentionConfig(**{"lambda": 0.5, "mode": "soft", "cam_target": "label"}), 0.5),
        "paper": (AttentionConfig(**{"lambda": 0.5, "mode": "paper"}), 0.5),
    }

    def step(kind: str) -> float:
        att, lam = kinds[kind]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        training_step(model, x, y, box, opt, scaler, att, lam, table)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for kind in kinds:
            step(kind)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            times[kind].append(step(kind))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "backbone": name,
        "image_size": size,
        "batch": batch,
        "repeats": repeats,
        "median_s": med,
        "ratio_soft_over_ce": med["soft"] / med["ce"],
        "ratio_paper_over_ce": med["paper"] / med["ce"],
        "all_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_time_cpu.json"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="one tiny case, one repeat")
    ap.add_argument("--only", nargs="*", help="backbone names to run")
    args = ap.parse_args(argv)
    cases = SMOKE_CASES if args.smoke else CPU_CASES
    if args.only:
        cases = [c for c in cases if c[0] in args.only]
    repeats, warmup = (1, 1) if args.smoke else (args.repeats, args.warmup)
    results = []
    for name, size, batch in cases:
        r = bench_case(name, size, batch, repeats, warmup, args.device)
        results.append(r)
        med = r["median_s"]
        print(
            f"{name:14s} {size}px b{batch}: CE {med['ce']:.3f}s  soft {med['soft']:.3f}s "
            f"({r['ratio_soft_over_ce']:.3f}x)  paper {med['paper']:.3f}s ({r['ratio_paper_over_ce']:.3f}x)",
            flush=True,
        )
    report = {
        "benchmark": "step_time",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target_ratio": 1.10,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
