"""Wall time of `cxr-sweep compare` on a 1000-image test set, its statistics and (--cli) the whole command.

The goal: < 10 s on 2 cores.

Synthetic predictions of two correlated models, binary and 3-class: the paired, stratified
bootstrap of Δ F1/YI/DP/accuracy/AUC (2000 resamples), DeLong (binary) and McNemar, as
``sweeps.results.compare`` runs them per candidate; and, binary, both sides trained with
``--seeds`` seeds (the bootstrap then scores every seed on each resample, the tests run per seed
pair). Each case runs ``--repeats`` times in one process; the median is reported.

``--cli`` adds the whole command, end to end: a sqlite MLflow store holding a sweep (parent run, a
CE baseline with λ = 1 and one attention run, binary, single seed), each run with the
``predictions/predictions.csv`` trials store (``--images`` val and ``--images`` test rows, written
by the trainer's own writer and logged as the tracking callback logs it), then
``cxr-sweep compare SWEEP --tracking-uri URI --resamples N`` in a fresh process, ``--repeats``
times: start-up, imports, the MLflow lookup, the downloads, the statistics, the three files and
their logging to the parent run.

    python benchmarks/compare_time.py --cli --out benchmarks/results/compare_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


SWEEP = "compare-bench"


class _SplitRows:
    """What ``write_predictions`` reads of a dataset cache: each split's cache rows (val, then test)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def split_indices(self, split: str) -> np.ndarray:
        return np.arange(self.n) + (self.n if split == "test" else 0)


def build_store(root: Path, images: int) -> str:
    """A sqlite store under ``root`` holding sweep :data:`SWEEP` as a finished sweep leaves it; its URI.

    Two trial runs under the parent, a CE baseline (λ = 1) and a soft-mode attention run, each with
    its ``best_val_*`` and ``test_*`` metrics computed from its own predictions, and those predictions
    (``images`` val and ``images`` test rows) under ``predictions/``."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking.runs import PREDICTIONS_FILE, experiment_id, log_metrics, log_params, log_predictions
    from trainer.loop import write_predictions
    from trainer.metrics import compute_metrics

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, SWEEP, uri)
    parent = client.create_run(exp, run_name=SWEEP, tags={"cxr.kind": "sweep"}).info.run_id
    client.log_param(parent, "metric", "val_f1_macro")
    splits = {"val": _case(2, images, 1), "test": _case(2, images, 2)}  # (labels, CE probs, attention probs)
    for i, (title, lam, side) in enumerate(
        (("CE λ=1 [t_00000]", "1.0", 1), ("soft λ=0.5 [t_00001]", "0.5", 2))
    ):
        tags = {"mlflow.parentRunId": parent, "cxr.kind": "trial", "cxr.sweep": SWEEP}
        tags |= {"ray.trial_id": f"t_{i:05d}", "cxr.cache_hash": "c0ffee" * 8, "cxr.data_access": "synthetic"}
        rid = client.create_run(exp, run_name=title, tags=tags).info.run_id
        params = {"data.task": "ne", "model.backbone": "resnet18", "attention.lambda": lam}
        log_params(client, rid, params | ({} if lam == "1.0" else {"attention.mode": "soft"}))
        preds = {split: {"y_true": c[0], "y_prob": c[side]} for split, c in splits.items()}
        val, test = splits["val"], splits["test"]
        metrics = {f"best_val_{k}": v for k, v in compute_metrics(val[0], val[side]).items()}
        metrics |= {f"test_{k}": v for k, v in compute_metrics(test[0], test[side]).items()}
        log_metrics(client, rid, metrics)
        folder = root / "trials" / rid
        folder.mkdir(parents=True)
        write_predictions(folder / PREDICTIONS_FILE, _SplitRows(images), ["normal", "effusion"], preds)
        log_predictions(client, rid, folder / PREDICTIONS_FILE)
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri


def time_cli(images: int, resamples: int, repeats: int) -> dict:
    """``cxr-sweep compare`` on a :func:`build_store` store, each time in a fresh process."""
    cli = str(Path(sys.executable).parent / "cxr-sweep")
    times = []
    with tempfile.TemporaryDirectory(prefix="compare-bench-") as tmp:
        root = Path(tmp)
        uri = build_store(root, images)
        load = os.getloadavg()  # other work on the machine slows every run alike: say how much there was
        cmd = [cli, "compare", SWEEP, "--tracking-uri", uri, "--resamples", str(resamples)]
        cmd += ["--out", str(root / "compare")]
        for _ in range(repeats):
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
            times.append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        (comp,) = json.loads((root / "compare" / "compare.json").read_text())["comparisons"]
        verdict = comp["verdict"]
        if comp["n_images"] != images:
            raise SystemExit(f"compare saw {comp['n_images']} test images, not {images}")
    median = statistics.median(times)
    print(f"cxr-sweep compare, {images} test images, {resamples} resamples: median {median:.2f} s")
    return {
        "command": f"cxr-sweep compare {SWEEP} --tracking-uri sqlite:///…/mlflow.db --resamples {resamples}"
        " --out …",
        "images": images,
        "resamples": resamples,
        "classes": 2,
        "seeds": 1,
        "candidates": 1,
        "seconds": times,
        "median_s": median,
        "verdict": verdict,
        "load_average_before": [round(x, 2) for x in load],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per side in the seed-repeats case")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_time_cpu.json"))
    ap.add_argument("--cli", action="store_true", help="also time the whole command in fresh processes")
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
    if args.cli:
        out["cli"] = time_cli(args.images, args.resamples, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
