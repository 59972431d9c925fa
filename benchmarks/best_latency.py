"""Wall time of ``cxr-sweep best`` on an existing sweep's MLflow store, read the two ways.

``best --top N`` lets MLflow sort on the metric and reads only the best pages; ``--top all`` reads
every run (as ``report`` does). Each command runs ``--repeats`` times, alternating, in fresh
processes (imports included: what a user waits for).

    python benchmarks/best_latency.py SWEEP --tracking-uri URI [--label sqlite-1000] --out FILE.json

The 1000-trial store of the driver benchmark (``driver_scale.py --mode replay --trials 1000``) is
what ``docs/performance.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cli = str(Path(sys.executable).parent / "cxr-sweep")
    base = [cli, "best", args.sweep, "--tracking-uri", args.tracking_uri]
    commands = {"top5": base, "top_all": [*base, "--top", "all"]}
    times: dict[str, list[float]] = {k: [] for k in commands}
    titles: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            t = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
            times[name].append(round(time.monotonic() - t, 2))
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
            titles[name] = out.stdout.strip().splitlines()[0]
    command = " ".join(["python benchmarks/best_latency.py", *(argv if argv is not None else sys.argv[1:])])
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    doc = {
        "benchmark": "best_latency",
        "command": command,
        "machine": machine,
        "label": args.label,
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "titles": titles,
    }
    print(json.dumps(doc, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
