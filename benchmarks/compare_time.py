"""Wall time of `cxr-sweep compare`'s statistics on a 1000-image test set (goal: < 10 s on 2 cores).

Synthetic predictions of two correlated models, binary and 3-class: the paired, stratified
bootstrap of Δ F1/YI/DP/accuracy/AUC (2000 resamples), DeLong (binary) and McNemar, as
``sweeps.results.compare`` runs them per candidate; and, binary, both sides trained with
``--seeds`` seeds (the bootstrap then scores every seed on each resample, the tests run per seed
pair). Each case runs ``--repeats`` times in one process; the median is reported.

    python benchmarks/compare_time.py --out benchmarks/results/compare_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from sweeps.results.stats import delong, mcnemar_exact, paired_bootstrap


def _case(n_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    shared = rng.normal(size=(n, n_classes))
    onehot = np.eye(n_classes)[labels]

    def probs(signal: float) -> np.ndarray:
        logits = signal * onehot + shared + rng.normal(size=(n, n_classes))
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    return labels, probs(1.0), probs(1.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per side in the seed-repeats case")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_time_cpu.json"))
    args = ap.parse_args(argv)
    results = []
    for n_classes, seeds in ((2, 1), (3, 1), (2, args.seeds)):
        cases = [_case(n_classes, args.images, n_classes + 10 * s) for s in range(seeds)]
        labels = cases[0][0]
        a = np.stack([c[1] for c in cases]) if seeds > 1 else cases[0][1]
        b = np.stack([c[2] for c in cases]) if seeds > 1 else cases[0][2]
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            paired_bootstrap(labels, a, b, n_resamples=args.resamples, seed=0)
            for pa, pb in zip(a.reshape(seeds, *a.shape[-2:]), b.reshape(seeds, *b.shape[-2:]), strict=True):
                mcnemar_exact(pa.argmax(1) == labels, pb.argmax(1) == labels)
                if n_classes == 2:
                    delong(labels == 1, pa[:, 1], pb[:, 1])
            times.append(time.perf_counter() - t0)
        results.append(
            {"classes": n_classes, "seeds": seeds, "seconds": times, "median_s": statistics.median(times)}
        )
        print(
            f"{n_classes} classes, {seeds} seed(s) per side, {args.images} images, {args.resamples} "
            f"resamples: median {statistics.median(times):.2f} s over {args.repeats}"
        )
    out = {
        "benchmark": "compare_time",
        "images": args.images,
        "resamples": args.resamples,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
