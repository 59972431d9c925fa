"""What seed repeats cost beyond the seeds' own training: one configuration with ``repeats: k``
against k single-seed trials of the same configuration, side by side in one process.

Two levels, alternated A/B/A/B so drift hits both alike:

- **trainer**: ``trainer.repeats.run_repeats`` (k seeds stepped in lockstep) against k calls of
  ``trainer.run_trial`` one after another — what stepping k generators in turn costs;
- **sweep**: the real driver (Ray Tune, MLflow callback, checkpoints every epoch) on a sweep of one
  fixed configuration: ``repeats: k, num_samples: 1`` against ``repeats: 1, num_samples: k``
  (one trial at a time in both, so only the repeats machinery differs: the per-epoch snapshot of
  k checkpoints, the seed runs in MLflow, the mean reports).

Overhead = T(repeats) / T(singles) − 1. timm ``test_resnet`` at 64 px on a phantom cache.

    python benchmarks/repeats_overhead.py --out benchmarks/results/repeats_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def _trial_config(cache: Path, out: Path, epochs: int) -> dict:
    return {
        "name": "bench",
        "output_dir": str(out),
        "data": {"cache": str(cache), "task": "ne"},
        "model": {"backbone": "test_resnet", "image_size": 64},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "seed": 0, "early_stop_patience": 100},
        "attention": {"lambda": 0.5, "mode": "soft", "tau": 0.1, "cam_target": "label"},
    }


def _trainer_pair(cache: Path, tmp: Path, k: int, epochs: int) -> tuple[float, float]:
    from trainer import run_trial
    from trainer.config import TrialConfig
    from trainer.repeats import run_repeats, seed_configs

    base = TrialConfig.from_dict(_trial_config(cache, tmp / "rep", epochs))
    t0 = time.perf_counter()
    run_repeats(seed_configs(base, k))
    t_rep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in seed_configs(TrialConfig.from_dict(_trial_config(cache, tmp / "one", epochs)), k):
        run_trial(c)
    t_one = time.perf_counter() - t0
    shutil.rmtree(tmp / "rep", ignore_errors=True)
    shutil.rmtree(tmp / "one", ignore_errors=True)
    return t_rep, t_one


def _sweep_file(tmp: Path, cache: Path, epochs: int, name: str, repeats: int, samples: int) -> Path:
    trial = _trial_config(cache, tmp / "unused", epochs)
    del trial["name"], trial["output_dir"]
    spec = {
        "name": name,
        "trial": trial,
        "params": {},
        "search": {"algorithm": "random", "seed": 0},
        "scheduler": {"type": "fifo"},
        "num_samples": samples,
        "repeats": repeats,
        "resources": {"cpu": 2, "gpu": 0},
        "max_concurrent_trials": 1,
        "metric": "val_f1_macro",
        "storage_path": str(tmp / "storage"),
        "max_failures": 0,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _sweep_pair(cache: Path, tmp: Path, k: int, epochs: int, i: int) -> tuple[float, float]:
    from sweeps.driver import run_sweep

    rep = _sweep_file(tmp, cache, epochs, f"rep{i}", k, 1)
    one = _sweep_file(tmp, cache, epochs, f"one{i}", 1, k)
    t0 = time.perf_counter()
    run_sweep(rep)
    t_rep = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_sweep(one)
    t_one = time.perf_counter() - t0
    return t_rep, t_one


def _record(rows: list[dict[str, float]], what: str, t_rep: float, t_one: float) -> None:
    rows.append({"repeats_s": t_rep, "singles_s": t_one, "ratio": t_rep / t_one})
    print(f"{what}: repeats {t_rep:.1f} s, singles {t_one:.1f} s, ratio {t_rep / t_one:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="k: seeds per configuration")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3, help="A/B pairs per level")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/repeats_overhead_cpu.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import ray

    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.tasks import classes_for

    results: dict[str, list[dict[str, float]]] = {"trainer": [], "sweep": []}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-repeats-") as d:
        tmp = Path(d)
        generate(tmp / "ph", n_patients=args.patients, classes=classes_for("ne"), size=64, seed=0)
        cache = cache_from_phantoms(tmp / "ph", tmp / "cache", "ne")
        _trainer_pair(cache, tmp, 1, 1)  # warm-up: imports, first allocations
        for i in range(args.pairs):
            _record(
                results["trainer"], f"trainer pair {i}", *_trainer_pair(cache, tmp, args.repeats, args.epochs)
            )
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        try:
            _sweep_pair(cache, tmp, 1, 1, -1)  # warm-up: Ray's workers, the MLflow store
            for i in range(args.pairs):
                pair = _sweep_pair(cache, tmp, args.repeats, args.epochs, i)
                _record(results["sweep"], f"sweep pair {i}", *pair)
        finally:
            ray.shutdown()
    summary = {
        level: {
            "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_overhead_pct": 100 * (statistics.median(r["ratio"] for r in rows) - 1),
        }
        for level, rows in results.items()
    }
    out = {
        "benchmark": "repeats_overhead",
        "repeats": args.repeats,
        "epochs": args.epochs,
        "backbone": "test_resnet",
        "image_size": 64,
        "pairs": results,
        "summary": summary,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for level, s in summary.items():
        print(f"{level}: repeats/singles = {s['median_ratio']:.3f} ({s['median_overhead_pct']:+.1f} %)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
