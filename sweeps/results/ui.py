"""The MLflow UI on a sweep's tracking store, bound to 127.0.0.1 (the store may hold patient paths).

``start_ui(uri)`` runs ``mlflow ui`` in a child process, waits until its ``/health`` answers and
returns the process with the base URL; the caller stops it. Port 0 picks a free port. The
server's GenAI job runner (judges, scorers: a pool of worker processes) is off unless
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: browsing sweeps does not need it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..tracking.lookup import SelectionError

__all__ = ["SweepViews", "experiment_url", "free_port", "start_ui", "stop_ui", "sweep_views"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def start_ui(
    tracking_uri: str, *, host: str = "127.0.0.1", port: int = 0, workers: int = 1, timeout: float = 120.0
) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow ui`` on ``tracking_uri``; return (process, ``http://host:port``) once it is healthy."""
    if port == 0:
        port = free_port(host)
    elif _port_taken(host, port):
        raise SelectionError(f"--port {port}: something already listens on {host}:{port} (use --port 0)")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # its own process group: stopping it stops the uvicorn workers it starts, too
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else "")[-2000:]
            raise SelectionError(f"mlflow ui exited with code {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    stop_ui(proc)
    raise SelectionError(f"mlflow ui on {url} did not become healthy within {timeout:.0f} s")


def stop_ui(proc: subprocess.Popen) -> None:
    """Stop the UI server and its workers (SIGTERM to its process group, SIGKILL after 10 s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group start_ui created: the server and its children only
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue


def experiment_url(base: str, experiment_id: str | None) -> str:
    """The runs table of one experiment (a sweep; MLflow 3 opens on a GenAI overview otherwise)."""
    return f"{base}/#/experiments/{experiment_id}/runs" if experiment_id else f"{base}/#/experiments"


# MLflow 3's experiment page takes its columns from a "shared view" stored in an experiment tag
# (mlflow.sharedViewState.<key>, JSON) and named by ?viewStateShareKey=<key>; the URL itself takes
# only the search (filter, sort). A filter alone still nests children under their parent
# (collapsed); a sort by a metric lists them flat. Checked in Chromium (tests/test_ui.py).
_SHARED_VIEW_TAG = "mlflow.sharedViewState."
_SHOWN_METRICS = ("test_f1_macro", "test_youden_index", "test_discriminant_power")


@dataclass(frozen=True)
class SweepViews:
    """URLs of the MLflow UI for one sweep: its trials flat and ranked, and a side-by-side compare."""

    trials: str  # the trial runs, best first on the sweep metric, with λ/mode/searched/F1/YI/DP columns
    charts: str  # the same runs with a parallel-coordinates chart: searched values → F1, YI, DP
    compare: str | None  # the top runs in MLflow's compare view (parallel coordinates first)
    runs: str  # the plain runs page (parent and children)


def _backticked(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def sweep_views(
    client,
    base: str,
    experiment_id: str,
    sweep: str,
    metric_key: str,
    mode: str,
    top: list,
    searched: list[str],
) -> SweepViews:
    """Save the sweep's shared view in its experiment (a tag; the store's only write) and return
    its URLs. ``top``: run ids best first; ``searched``: the searched keys (``search.*`` params)."""
    view = {
        "searchFilter": "tags.`cxr.kind` = 'trial'",
        "orderByKey": _backticked("metrics", metric_key),
        "orderByAsc": mode == "min",
        "selectedColumns": [
            _backticked("metrics", metric_key),
            *(_backticked("params", k) for k in ("attention.lambda", "attention.mode")),
            *(_backticked("params", k) for k in searched if k != "search.attention.lambda"),
            *(_backticked("metrics", m) for m in _SHOWN_METRICS),
        ],
        # the chart view (compareRunsMode=CHART): one section holding a parallel-coordinates chart
        "compareRunSections": [
            {"uuid": "cxr-sweep", "name": "Sweep", "display": True, "isReordered": True, "deleted": False}
        ],
        "compareRunCharts": [
            {
                "uuid": "cxr-parallel",
                "type": "PARALLEL",
                "metricSectionId": "cxr-sweep",
                "displayName": "searched values → validation and test metrics",
                "selectedParams": searched or ["attention.lambda"],
                "selectedMetrics": [metric_key, *_SHOWN_METRICS],
                "showAllRuns": True,
                "runsCountToCompare": 100,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "isAccordionReordered": True,
    }
    key = f"cxr-{sweep}"
    client.set_experiment_tag(experiment_id, f"{_SHARED_VIEW_TAG}{key}", json.dumps(view))
    trials = f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={urllib.parse.quote(key)}"
    compare = None
    if len(top) >= 2:
        lists = {"runs": list(top), "experiments": [experiment_id]}
        as_json = {k: json.dumps(v, separators=(",", ":")) for k, v in lists.items()}
        query = urllib.parse.urlencode(as_json, quote_via=urllib.parse.quote)
        compare = f"{base}/#/compare-runs?{query}"
    return SweepViews(trials, f"{trials}&compareRunsMode=CHART", compare, experiment_url(base, experiment_id))
