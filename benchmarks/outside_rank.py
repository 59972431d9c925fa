"""Do the outside scores rank a shortcut benchmark's methods as the marker effect does?

Reads a finished ``benchmarks/shortcut.py`` run (its results JSON and its ``--work`` folder: the
sweeps' MLflow store, the models and the shortcut cache) and scores every seed's model again, on
the validation split (where the marker goes with the label) and the test split (where it does
not), with the product's own lung-only images (:mod:`trainer.outside`):

* ``outside_evidence``: the signed mean drop in P(true class), as trials log it;
* ``outside_dependence``: the mean of its magnitude.

Then Spearman's ρ of each against the marker effect, over the rows of the shortcut task.

    python benchmarks/outside_rank.py --result benchmarks/results/shortcut_decision_cpu.json \\
        --work /work/sc-decision --out benchmarks/results/outside_rank_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


@torch.no_grad()
def _scores(model, cache, split: str, fill: str, dilate_px: int) -> dict[str, float]:
    from trainer.data.cache import CacheDataset, collate_batch
    from trainer.data.transforms import BatchTransform
    from trainer.outside import OutsideScores, fill_outside, lung_region

    loader = torch.utils.data.DataLoader(CacheDataset(cache, split), batch_size=64, collate_fn=collate_batch)
    prep = BatchTransform("cpu")
    scores = OutsideScores()
    noise = torch.Generator().manual_seed(0)
    for raw in loader:
        b = prep(raw)
        lungs_only = fill_outside(b["image"], lung_region(b["lung"], dilate_px), fill, noise)
        scores.update(model(b["image"]).softmax(1), model(lungs_only).softmax(1), b["label"])
    out = scores.compute(len(cache.classes))
    return {k: out[k] for k in ("outside_evidence", "outside_dependence")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--result", type=Path, required=True, help="a benchmarks/shortcut.py results JSON")
    ap.add_argument("--work", type=Path, required=True, help="that run's --work folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fill", default="mean")
    ap.add_argument("--dilate-px", type=int, default=8)
    args = ap.parse_args(argv)
    from scipy.stats import spearmanr

    from sweeps.results.export import load_trained, model_file
    from sweeps.tracking.lookup import find_runs
    from trainer.data.cache import open_cache

    result = json.loads(args.result.read_text())
    task = next(t for t in result["tasks"] if t["condition"] == "shortcut")
    storage = args.work / "sweeps"
    runs = {r.run_id: r for r in find_runs(list(task["sweeps"]), storage=storage).runs}
    cache = open_cache(args.work / "cache" / f"{task['task']}-shortcut", verify=False)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, m in task["methods"].items():
            per_seed = []
            for seed in m["per_seed"]:
                model, _ = load_trained(model_file(runs[seed["run_id"]], Path(tmp)))
                model.eval()
                per_seed.append(
                    {s: _scores(model, cache, s, args.fill, args.dilate_px) for s in ("val", "test")}
                )
            rows[method] = {
                f"{split}_{k}": statistics.fmean(p[split][k] for p in per_seed)
                for split in ("val", "test")
                for k in ("outside_evidence", "outside_dependence")
            }
            rows[method]["marker_effect"] = m["summary"]["marker_effect"]["mean"]
            print(method, {k: round(v, 3) for k, v in rows[method].items()}, flush=True)
    marker = [r["marker_effect"] for r in rows.values()]
    rho = {
        k: float(spearmanr([r[k] for r in rows.values()], marker).statistic)
        for k in next(iter(rows.values()))
        if k != "marker_effect"
    }
    for k, v in rho.items():
        print(f"Spearman ρ({k}, marker effect) = {v:+.2f}")
    report = {
        "benchmark": "outside_rank",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "result": str(args.result),
        "fill": args.fill,
        "dilate_px": args.dilate_px,
        "rows": rows,
        "spearman_vs_marker_effect": rho,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
