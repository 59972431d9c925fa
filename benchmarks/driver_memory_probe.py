"""What the sweep driver's memory holds per trial through Tune: a diagnostic for docs/performance.md.

Runs ``driver_scale.py --mode ray`` on sqlite and, at two moments, counts the driver's Python objects
by type (``gc``) with its RSS and Tune's trial count; prints the objects that grew most between the
two, and the pickled size of a Tune ``Trial``'s state by attribute. It uses ``gc`` counts, not
tracemalloc: under tracemalloc the sweep finished 49 trials in its first 4 minutes, against about 3
trials/s without it (2 cores, 2026-12-02). Example, the run behind docs/performance.md::

    python benchmarks/driver_memory_probe.py --trials 600 --at 45,150
"""

from __future__ import annotations

import argparse
import collections
import gc
import pickle
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import driver_scale


def _rss_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=600)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--at", default="45,150", help="seconds into the run of the two counts")
    args = ap.parse_args(argv)
    snaps: dict[float, collections.Counter] = {}

    def probe(at: float) -> None:
        gc.collect()
        objs = gc.get_objects()
        snaps[at] = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objs)
        ctl = [o for o in objs if type(o).__name__ == "TuneController"]
        n = len(ctl[0]._trials) if ctl else -1
        print(f"PROBE t={at:g}s: rss {_rss_mib():.0f} MiB, objects {len(objs)}, trials {n}", flush=True)
        if len(snaps) == 2:
            a, b = sorted(snaps)
            print("PROBE grew", (snaps[b] - snaps[a]).most_common(40), flush=True)
            for t in ctl[0]._trials[:2] if ctl else []:
                state = t.__getstate__()
                sizes = {k: len(pickle.dumps(v)) for k, v in state.items()}
                print("PROBE trial state bytes", len(pickle.dumps(state)), sizes, flush=True)

    for at in (float(x) for x in args.at.split(",")):
        threading.Timer(at, probe, (at,)).start()
    run = ["--mode", "ray", "--stores", "sqlite", "--concurrent", str(args.concurrent)]
    return driver_scale.main([*run, "--trials", str(args.trials), "--epochs", "1", "--period", "0.05"])


if __name__ == "__main__":
    sys.exit(main())
