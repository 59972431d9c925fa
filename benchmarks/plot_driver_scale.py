"""The driver-at-scale figure of docs/performance.md from ``benchmarks/results/driver_scale_*.json``.

python benchmarks/plot_driver_scale.py   # writes docs/img/driver_scale.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def rows() -> list[dict]:
    out = []
    for f in sorted(RESULTS.glob("driver_scale_*.json")):
        out += [r for r in json.loads(f.read_text())["scenarios"] if r["mode"] == "replay"]
    return out


def main(out: Path = ROOT / "docs" / "img" / "driver_scale.png") -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    stores = ("sqlite", "server")

    def pick(store, writers, **where):
        same = [r for r in data if r["store"] == store and r["writers"] == writers]
        return [r for r in same if not r.get("server_down_s") and all(r[k] == v for k, v in where.items())]

    for k, (writers, label) in enumerate((("0", "in Tune's thread (before)"), ("default", "writer threads"))):
        x = [i + 0.38 * k for i in range(len(stores))]
        flood = [pick(s, writers, trials=64, period_s=0.0) for s in stores]
        axes[0].bar(x, [f[0]["results_per_s"] if f else 0 for f in flood], width=0.36, label=label)
        paced = [pick(s, writers, trials=256) for s in stores]
        axes[1].bar(
            x, [p_[0]["latency_p99_s"] if p_ else 0 for p_ in paced], width=0.36, label=f"{label}, p99"
        )
        axes[1].bar(
            x, [p_[0]["latency_p50_s"] if p_ else 0 for p_ in paced], width=0.18, color="k", alpha=0.35
        )
    for ax in axes[:2]:
        ax.set_xticks([i + 0.19 for i in range(len(stores))], stores)
    axes[0].set(title="results/s sustained, 64 trials, as fast as taken", ylabel="results/s")
    axes[1].set(title="latency p99 (dark: p50), 256 trials, 1 result / 10 s each", ylabel="s")
    for store, marker in (("sqlite", "o"), ("server", "s")):
        ok = [r for r in data if r["store"] == store and r["writers"] == "default" and "best_error" not in r]
        best = sorted((r["trials"], r["best_s"]) for r in ok)
        if best:
            axes[2].plot([n for n, _ in best], [b for _, b in best], marker + "-", label=store)
    axes[2].axhline(5, color="grey", lw=0.8, ls=":", label="goal (5 s)")
    axes[2].set(title="`cxr-sweep best` wall time", xlabel="trials in the sweep", ylabel="s", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("One sweep driver, 2 CPU cores (benchmarks/driver_scale.py, replay mode)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
