"""Peak memory of the attention training step ÷ the cross-entropy step (CPU: peak RSS).

Each variant (``ce``, ``soft``, ``paper``, and ``soft_ref`` where Grad-CAM takes a head
shortcut, see ``step_time.py``) runs in a fresh Python process — peak RSS never goes down, so
variants sharing a process would hide each other — that builds the model and Adam, runs
``--steps`` training steps (Adam's state exists from the first), and reports ``ru_maxrss``.
The ratio is on the whole process's peak, the figure a scheduler packing trials sees; the
step's own increment (peak − peak before the first step) is reported beside it. On CUDA,
``step_time.py --device cuda`` records ``torch.cuda.max_memory_allocated`` per variant.

    python benchmarks/memory.py --out benchmarks/results/memory_cpu.json
    python benchmarks/memory.py --smoke --out /tmp/mem.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "measure"]

_HERE = Path(__file__).resolve().parent


def _child(name: str, size: int, batch: int, kind: str, steps: int) -> None:
    """In the fresh process: set up, step, print peak RSS before and after the steps (bytes)."""
    sys.path.insert(0, str(_HERE))
    from step_time import StepCase

    case = StepCase(name, size, batch, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    for _ in range(steps):
        case.step(kind)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "peak_before_steps_bytes": before, "kinds": case.kinds}))


def measure(name: str, size: int, batch: int, kind: str, steps: int) -> dict:
    """Run one variant in a fresh interpreter; its peak RSS (bytes) and the case's variants."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(size), str(batch), kind]
    proc = subprocess.run([*cmd, "--steps", str(steps)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {kind}: child failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_cpu.json"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="one tiny case")
    ap.add_argument("--only", nargs="*", help="backbone names to run")
    ap.add_argument("--child", nargs=4, metavar=("BACKBONE", "SIZE", "BATCH", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, size, batch, kind = args.child
        _child(name, int(size), int(batch), kind, args.steps)
        return 0

    sys.path.insert(0, str(_HERE))
    from step_time import CPU_CASES, SMOKE_CASES

    paper = ("resnet50", "vgg16", "pvt_v2_b2_li")
    cases = SMOKE_CASES if args.smoke else [c for c in CPU_CASES if c[0] in paper]
    if args.only:
        cases = [c for c in cases if c[0] in args.only]
    results = []
    for name, size, batch in cases:
        rss = {"ce": measure(name, size, batch, "ce", args.steps)}
        kinds = rss["ce"]["kinds"]
        rss.update({k: measure(name, size, batch, k, args.steps) for k in kinds[1:]})
        peak = {k: v["peak_rss_bytes"] for k, v in rss.items()}
        step = {k: v["peak_rss_bytes"] - v["peak_before_steps_bytes"] for k, v in rss.items()}
        r = {
            "backbone": name,
            "image_size": size,
            "batch": batch,
            "steps": args.steps,
            "peak_rss_bytes": peak,
            "step_increment_bytes": step,
            **{f"ratio_peak_{k}_over_ce": peak[k] / peak["ce"] for k in kinds if k != "ce"},
        }
        results.append(r)
        ratios = "  ".join(
            f"{k} {peak[k] / 2**20:.0f} MiB ({r[f'ratio_peak_{k}_over_ce']:.3f}x)" for k in kinds[1:]
        )
        print(f"{name:14s} {size}px b{batch}: CE {peak['ce'] / 2**20:.0f} MiB  {ratios}", flush=True)
    report = {
        "benchmark": "memory",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu",
        "measure": "peak RSS (ru_maxrss) of a fresh process per variant: model, Adam, steps",
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target_ratio": 1.3,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
