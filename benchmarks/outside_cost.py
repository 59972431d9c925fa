"""What scoring the outside of the lungs (``outside.score``) costs an evaluation pass.

The product's own :func:`trainer.epoch.evaluate` on a phantom cache, with ``outside.score`` on
and off, interleaved round by round (so drift in machine load hits both alike); the median of
each is reported, and their ratio. Scoring adds one forward pass (no backward) per image to a
pass that already runs a forward and the Grad-CAM's backward.

    python benchmarks/outside_cost.py --out benchmarks/results/outside_cost_cpu.json
    python benchmarks/outside_cost.py --smoke --out /tmp/oc.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = [("test_resnet", 128), ("resnet18", 128), ("resnet50", 224)]  # (backbone, image size)


def _case(backbone: str, size: int, cache: Path, repeats: int, n_val: int) -> dict:
    from trainer.backbones import create_backbone
    from trainer.config import TrialConfig
    from trainer.data.cache import open_cache
    from trainer.data.transforms import BatchTransform
    from trainer.epoch import evaluate
    from trainer.loop import split_loader
    from trainer.priors import prior_table

    torch.manual_seed(0)
    raw = {"data": {"cache": str(cache)}, "model": {"backbone": backbone, "image_size": size}}
    raw["train"] = {"batch_size": 16}
    cfgs = {on: TrialConfig.from_dict({**raw, "outside": {"score": on}}) for on in (True, False)}
    c = open_cache(cache, verify=False)
    loader = split_loader(c, "val", cfgs[True], torch.device("cpu"))
    prep = BatchTransform("cpu", size=size)
    model = create_backbone(backbone, num_classes=2)
    table = prior_table(cfgs[True].data.classes, cfgs[True].attention.priors)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(repeats + 1):  # the first round warms up
        for on in (False, True):
            t0 = time.perf_counter()
            evaluate(model, loader, prep, cfgs[on], table, None, 1.0)
            if i:
                times["on" if on else "off"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["on"], times["off"], strict=True))
    return {
        "backbone": backbone,
        "image_size": size,
        "val_images": n_val,
        "median_s": med,
        "ratio_on_over_off": med["on"] / med["off"],
        "ratio_paired_on_over_off": paired,
        "all_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/outside_cost_cpu.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--smoke", action="store_true", help="one tiny case, one round")
    args = ap.parse_args(argv)
    from trainer.data.cache import open_cache
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms

    cases = [("test_resnet", 64)] if args.smoke else CASES
    repeats, patients = (1, 24) if args.smoke else (args.repeats, args.patients)
    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-outside-") as tmp:
        generate(Path(tmp) / "ph", n_patients=patients, classes=("No Finding", "Effusion"), size=128, seed=0)
        cache = cache_from_phantoms(Path(tmp) / "ph", Path(tmp) / "cache", "ne")
        n_val = len(open_cache(cache, verify=False).split_indices("val"))
        for backbone, size in cases:
            r = _case(backbone, size, cache, repeats, n_val)
            results.append(r)
            med = r["median_s"]
            print(
                f"{backbone:12s} {size}px, {n_val} val images: off {med['off']:.2f} s, on {med['on']:.2f} s "
                f"({r['ratio_on_over_off']:.3f}x, paired {r['ratio_paired_on_over_off']:.3f}x)",
                flush=True,
            )
    report = {
        "benchmark": "outside_cost",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
