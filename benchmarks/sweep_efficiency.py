"""Sweep efficiency on a phantom task, measured with the product's own driver.

1. **Search efficiency**: the full grid vs Optuna (TPE) + ASHA over the same space. For each,
   the compute (trial-epochs, in completion order) needed until the best validation F1 so far
   is within ``--tolerance`` of the grid's best. Ratio = Optuna+ASHA ÷ grid (target ≤ 0.30).
2. **Scheduling overhead** with fake GPUs: sweep wall time ÷ (N / G × mean trial time), where a
   trial's time is what it spent running (Ray's ``time_total_s``) (target ≤ 1.15).

    python benchmarks/sweep_efficiency.py --out benchmarks/results/sweep_efficiency_cpu.json
    python benchmarks/sweep_efficiency.py --smoke --out /tmp/se.json     # a minute, for tests
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

LAMBDAS = [1.0, 0.75, 0.5, 0.25, "adaptive"]
LRS = [3e-4, 1e-3, 3e-3]
THRESHOLDS = [0.3, 0.5, 0.7]


def _space(
    name,
    cache,
    storage,
    params,
    search,
    scheduler,
    num_samples,
    epochs,
    gpus_per_trial,
    concurrent,
    reuse=True,
):
    return {
        "reuse_actors": reuse,
        "name": name,
        "trial": {
            "data": {"cache": str(cache), "task": "ne"},
            "model": {"backbone": "test_resnet"},
            "train": {
                "epochs": epochs,
                "batch_size": 16,
                "lr": 1e-3,
                "plateau_patience": 2,
                "early_stop_patience": epochs,
            },
            "attention": {"mode": "soft", "tau": 0.1, "cam_target": "label"},
        },
        "params": params,
        "search": search,
        "scheduler": scheduler,
        "num_samples": num_samples,
        "resources": {"cpu": 0.5, "gpu": gpus_per_trial},
        "max_concurrent_trials": concurrent,
        "storage_path": str(storage),
        "max_failures": 0,
    }


def _run(space: dict, workdir: Path) -> tuple[float, list[dict], object]:
    from sweeps.driver import run_sweep

    f = workdir / f"{space['name']}.yaml"
    f.write_text(yaml.safe_dump(space, sort_keys=False))
    t0 = time.perf_counter()
    outcome = run_sweep(f)
    wall = time.perf_counter() - t0
    return wall, outcome.rows, outcome


def _trial_records(storage: Path, name: str) -> list[dict]:
    """Per trial: epochs trained, finish time, best val F1 and time spent running (from result.json)."""
    recs = []
    for d in sorted((storage / name).glob("sweep_trainable_*")):
        lines = [json.loads(x) for x in (d / "result.json").read_text().splitlines() if x.strip()]
        if not lines:
            continue
        f1 = [r["val_f1_macro"] for r in lines if "val_f1_macro" in r and not r.get("trial_done")]
        recs.append(
            {
                "trial": lines[-1].get("trial_id"),
                "epochs": max(int(r.get("epochs_done", 0)) for r in lines),
                "finished_at": lines[-1]["timestamp"],
                "best_val_f1": max(f1) if f1 else float("nan"),
                "time_total_s": lines[-1]["time_total_s"],
            }
        )
    return sorted(recs, key=lambda r: r["finished_at"])


def _epochs_to_reach(recs: list[dict], target: float) -> int | None:
    spent = 0
    for r in recs:
        spent += r["epochs"]
        if r["best_val_f1"] >= target:
            return spent
    return None


def _search_efficiency(args, cache, storage, work, lambdas, lrs, ths, epochs, optuna_samples) -> dict:
    grid_params = {
        "attention.lambda": {"type": "grid", "values": lambdas},
        "train.lr": {"type": "grid", "values": lrs},
        "attention.threshold": {"type": "grid", "values": ths},
    }
    grid = _space(
        "grid", cache, storage, grid_params, {"algorithm": "grid"}, {"type": "fifo"}, 1, epochs, 0, 2
    )
    grid_wall, _, _ = _run(grid, work)
    grid_recs = _trial_records(storage, "grid")
    grid_best = max(r["best_val_f1"] for r in grid_recs)
    grid_cost = sum(r["epochs"] for r in grid_recs)
    opt_params = {key: {"type": "choice", "values": p["values"]} for key, p in grid_params.items()}
    opt = _space(
        "optuna_asha",
        cache,
        storage,
        opt_params,
        {"algorithm": "optuna", "seed": 0},
        {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        optuna_samples,
        epochs,
        0,
        2,
    )
    opt_wall, _, _ = _run(opt, work)
    opt_recs = _trial_records(storage, "optuna_asha")
    target = grid_best - args.tolerance
    opt_needed = _epochs_to_reach(opt_recs, target)
    return {
        "grid": {
            "trials": len(grid_recs),
            "trial_epochs": grid_cost,
            "best_val_f1": grid_best,
            "trial_epochs_to_reach_target": _epochs_to_reach(grid_recs, target),
            "wall_s": grid_wall,
        },
        "optuna_asha": {
            "trials": len(opt_recs),
            "trial_epochs": sum(r["epochs"] for r in opt_recs),
            "trials_stopped_early": sum(r["epochs"] < epochs for r in opt_recs),
            "best_val_f1": max(r["best_val_f1"] for r in opt_recs),
            "trial_epochs_to_reach_target": opt_needed,
            "wall_s": opt_wall,
        },
        "target_val_f1": target,
        "compute_ratio_optuna_over_grid": (opt_needed / grid_cost) if opt_needed else None,
        "compute_ratio_target": 0.30,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep_efficiency_cpu.json"))
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--optuna-samples", type=int, default=16)
    ap.add_argument("--overhead-trials", type=int, default=8)
    ap.add_argument("--overhead-epochs", type=int, default=16)
    ap.add_argument("--fake-gpus", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only-overhead", action="store_true", help="skip the grid vs Optuna comparison")
    args = ap.parse_args(argv)
    import ray

    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.tasks import classes_for

    lambdas, lrs, ths = (LAMBDAS[:2], LRS[1:2], THRESHOLDS[1:2]) if args.smoke else (LAMBDAS, LRS, THRESHOLDS)
    epochs = 2 if args.smoke else args.epochs
    optuna_samples = 2 if args.smoke else args.optuna_samples
    overhead_trials = 2 if args.smoke else args.overhead_trials
    overhead_epochs = 2 if args.smoke else args.overhead_epochs
    work = Path(tempfile.mkdtemp(prefix="cxr-sweep-bench-"))
    generate(
        work / "ph", n_patients=30 if args.smoke else args.patients, classes=classes_for("ne"), size=args.size
    )
    cache = cache_from_phantoms(work / "ph", work / "cache", "ne")
    storage = work / "storage"

    ray.init(
        address="local", num_cpus=2, num_gpus=args.fake_gpus, include_dashboard=False, log_to_driver=False
    )
    from mlflow.tracking import MlflowClient

    from sweeps.tracking.store import default_tracking_uri

    storage.mkdir(parents=True)
    MlflowClient(default_tracking_uri(storage)).search_experiments()  # create the store outside the timings
    report: dict = {
        "benchmark": "sweep_efficiency",
        "command": " ".join(
            ["benchmarks/sweep_efficiency.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "task": "ne phantoms",
        "patients": 30 if args.smoke else args.patients,
        "image_size": args.size,
        "epochs_per_trial": epochs,
    }
    try:
        if not args.only_overhead:
            report.update(
                _search_efficiency(args, cache, storage, work, lambdas, lrs, ths, epochs, optuna_samples)
            )
        # scheduling overhead: N equal trials, one fake GPU each, G at a time; with and without
        # reusing worker processes, side by side
        over_params = {"attention.threshold": {"type": "uniform", "low": 0.4, "high": 0.6}}
        report["overhead"] = {}
        for label, reuse in (("reuse_actors", True), ("fresh_actors", False)):
            over = _space(
                f"overhead_{label}",
                cache,
                storage,
                over_params,
                {"algorithm": "random", "seed": 0},
                {"type": "fifo"},
                overhead_trials,
                overhead_epochs,
                1,
                args.fake_gpus,
                reuse=reuse,
            )
            wall, _, _ = _run(over, work)
            recs = _trial_records(storage, over["name"])
            mean_trial = sum(r["time_total_s"] for r in recs) / len(recs)
            ideal = overhead_trials / args.fake_gpus * mean_trial
            report["overhead"][label] = {
                "trials": overhead_trials,
                "epochs_per_trial": overhead_epochs,
                "fake_gpus": args.fake_gpus,
                "sweep_wall_s": wall,
                "mean_trial_s": mean_trial,
                "ideal_s": ideal,
                "ratio": wall / ideal,
                "target": 1.15,
                "trials_per_hour": overhead_trials / wall * 3600,
            }
    finally:
        ray.shutdown()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if isinstance(v, dict)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
