"""Find a sweep's trial runs in MLflow: the store that holds the sweep, its latest parent run and
the finished children, as :class:`RunRow` objects that selection, reports and export read.

A sweep's runs follow DESIGN.md §4: one parent run (``cxr.kind=sweep``) per sweep, one child run
(``cxr.kind=trial``) per trial with ``best_val_*`` and ``test_*`` summaries. *Finished* means
status FINISHED and not stopped early by ASHA (those never reached a test evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

from ..space import load_saved_spec
from .store import resolve_tracking_uri

__all__ = [
    "RunRow",
    "SelectionError",
    "SweepRuns",
    "find_runs",
    "find_top_runs",
    "open_store",
    "row_from_run",
    "sweep_experiment",
]

_DEFAULT_METRIC = "val_f1_macro"
TOP_PAGE = 50  # the fewest runs find_top_runs reads per request


class SelectionError(ConfigError):
    """Bad input to selection, reports or export: unknown sweep or run, no finished runs, bad metric."""


@dataclass
class RunRow:
    """One trial run as selection and reports see it."""

    run_id: str
    run_name: str
    experiment: str
    sweep: str
    trial_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def searched(self) -> dict[str, Any]:
        """The searched values (``search.*`` params) in name order, numbers as numbers; without any,
        the settings a reader looks for first."""
        found = {k.removeprefix("search."): v for k, v in self.params.items() if k.startswith("search.")}
        if not found:
            keys = ("model.backbone", "attention.lambda", "attention.mode", "attention.threshold", "train.lr")
            found = {k: self.params[k] for k in keys if k in self.params}
        return {k: _typed(found[k]) for k in sorted(found)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "experiment": self.experiment,
            "sweep": self.sweep,
            "trial_id": self.trial_id,
            "status": self.status,
            "searched": self.searched,
            "params": self.params,
            "metrics": self.metrics,
        }


def _typed(value: str) -> Any:
    """An MLflow param (always a string) as the number or flag it was, else the string."""
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@dataclass
class SweepRuns:
    """The finished trial runs of one or more sweeps, and where they came from."""

    tracking_uri: str
    runs: list[RunRow]
    parents: dict[str, str]  # sweep (experiment) name → parent run id
    default_metric: str = _DEFAULT_METRIC
    objectives: list[str] = field(default_factory=list)  # a multi-objective sweep's metrics
    complete: bool = True  # False: only the best runs were read (:func:`find_top_runs`), not every one


# ---- the tracking store -------------------------------------------------------------------------------
def open_store(sweep: str | None, storage: str | Path | None, tracking_uri: str | None) -> str:
    """The tracking URI that holds ``sweep``: like ``cxr-sweep sweep status`` resolves a sweep.

    ``--tracking-uri`` wins; else ``--storage`` (the sweep's saved spec says where its MLflow store
    is); else ``$MLFLOW_TRACKING_URI``; else ``./mlflow.db``. A sqlite store must exist: opening a
    missing one would silently create an empty database.
    """
    spec = None
    if not tracking_uri and storage is not None:
        if sweep is None:
            raise SelectionError("--storage needs a SWEEP name (or pass --tracking-uri with --experiment)")
        spec, _ = load_saved_spec(sweep, storage)
    uri = resolve_tracking_uri(tracking_uri, spec=spec)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise SelectionError(
                f"no MLflow store at {db}: pass --storage DIR (the sweep's storage_path) or --tracking-uri"
            )
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise SelectionError(
            f"unknown sweep {name!r}: no MLflow experiment of that name in {uri} "
            f"(experiments: {', '.join(known) or 'none'})"
        )
    return exp


def _latest_parent(client, exp, sweep: str):
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`cxr.kind` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise SelectionError(f"sweep {sweep!r}: experiment has no sweep parent run (cxr.kind=sweep)")
    return parents[0]


def row_from_run(run, experiment: str) -> RunRow:
    """An MLflow ``Run`` as a :class:`RunRow`."""
    tags = run.data.tags
    return RunRow(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        experiment=experiment,
        sweep=tags.get("cxr.sweep", experiment),
        trial_id=tags.get("ray.trial_id", ""),
        status=run.info.status,
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        tags=dict(tags),
    )


def _finished(row: RunRow) -> bool:
    return row.status == "FINISHED" and row.tags.get("cxr.stopped_early") != "true"


def find_runs(
    sweeps: list[str],
    *,
    storage: str | Path | None = None,
    tracking_uri: str | None = None,
    experiments: list[str] | None = None,
    filter_string: str | None = None,
    include_stopped: bool = False,
) -> SweepRuns:
    """Finished trial runs of ``sweeps`` (children of each sweep's latest parent run) and of every
    trial run in ``experiments``, narrowed by an MLflow ``filter_string`` (e.g.
    ``"params.`model.backbone` = 'resnet50'"``). ``include_stopped`` keeps ASHA-stopped runs."""
    if not sweeps and not experiments:
        raise SelectionError("name a SWEEP or pass --experiment")
    uri = open_store(sweeps[0] if sweeps else None, storage, tracking_uri)
    client = _client(uri)
    extra = f" and {filter_string}" if filter_string else ""
    sources: list[tuple[str, str, str]] = []  # (label, experiment id, filter)
    parents: dict[str, str] = {}
    default_metric = _DEFAULT_METRIC
    objectives: list[str] = []
    for name in sweeps:
        exp_name = sweep_experiment(name, storage) or name
        exp = _experiment(client, exp_name, uri)
        parent = _latest_parent(client, exp, name)
        parents[exp_name] = parent.info.run_id
        default_metric = parent.data.params.get("metric", default_metric)
        objectives = [m for m in parent.data.params.get("objectives", "").split(",") if m]
        sources.append(
            (f"sweep {name!r}", exp.experiment_id, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        )
    for name in experiments or []:
        exp = _experiment(client, name, uri)
        sources.append((f"experiment {name!r}", exp.experiment_id, "tags.`cxr.kind` = 'trial'"))
    rows: dict[str, RunRow] = {}
    for label, exp_id, base in sources:
        exp_name = client.get_experiment(exp_id).name
        try:
            found = client.search_runs([exp_id], filter_string=base + extra, max_results=50000)
        except Exception as e:
            from .writer import store_unreachable

            if filter_string and not store_unreachable(e):  # MLflow rejects a bad filter with its reason
                raise SelectionError(f"--filter {filter_string!r}: {e}") from None
            raise SelectionError(f"{label}: searching its runs in {uri} failed: {e}") from None
        these = [row_from_run(r, exp_name) for r in found if r.data.tags.get("cxr.kind", "trial") == "trial"]
        keep = [r for r in these if _finished(r) or (include_stopped and r.status == "FINISHED")]
        if not keep:
            raise SelectionError(f"{label} has no finished trial runs ({_census(these)})")
        rows.update((r.run_id, r) for r in keep)
    return SweepRuns(uri, list(rows.values()), parents, default_metric, objectives)


def find_top_runs(
    sweep: str,
    n: int,
    metric: Callable[[str], tuple[str, bool]],
    *,
    storage: str | Path | None = None,
    tracking_uri: str | None = None,
    filter_string: str | None = None,
    include_stopped: bool = False,
) -> SweepRuns:
    """The ``n`` best finished trial runs of one sweep (ties at the n-th value all included), without
    reading every run: MLflow sorts on the metric and the runs are read a page at a time, best first
    (1000 runs on sqlite: 0.2 s instead of 9 s). ``metric(default)`` → (metric key, higher is
    better), given the sweep's own metric. ``complete`` says whether every run was read anyway
    (a small sweep). A sweep with no finished run gets :func:`find_runs`'s error."""
    uri = open_store(sweep, storage, tracking_uri)
    client = _client(uri)
    exp_name = sweep_experiment(sweep, storage) or sweep
    exp = _experiment(client, exp_name, uri)
    parent = _latest_parent(client, exp, sweep)
    default_metric = parent.data.params.get("metric", _DEFAULT_METRIC)
    key, higher = metric(default_metric)
    base = f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = 'FINISHED'"
    base += f" and {filter_string}" if filter_string else ""
    order = [f"metrics.`{key}` {'DESC' if higher else 'ASC'}"]  # MLflow puts NaN and missing last

    def value(r: RunRow) -> float | None:
        v = r.metrics.get(key)
        return v if v is not None and math.isfinite(v) else None

    kept: list[RunRow] = []
    token = None
    while True:
        try:
            page = client.search_runs(
                [exp.experiment_id],
                filter_string=base,
                order_by=order,
                max_results=max(4 * n, TOP_PAGE),
                page_token=token,
            )
        except Exception:  # a bad filter, the store gone: the full search says which, with the same words
            break
        rows = [row_from_run(r, exp_name) for r in page if r.data.tags.get("cxr.kind", "trial") == "trial"]
        kept += [r for r in rows if _finished(r) or include_stopped]
        token = page.token
        ranked = sorted((v for r in kept if (v := value(r)) is not None), reverse=higher)
        if not token:
            break
        last = value(row_from_run(page[-1], exp_name)) if page else None
        if len(ranked) >= n and (last is None or (last < ranked[n - 1] if higher else last > ranked[n - 1])):
            break  # every run after this page is worse than the n-th: the top n (and its ties) are read
    if not any(value(r) is not None for r in kept):
        return find_runs(
            [sweep], storage=storage, tracking_uri=tracking_uri, filter_string=filter_string,
            include_stopped=include_stopped,
        )  # fmt: skip
    objectives = [m for m in parent.data.params.get("objectives", "").split(",") if m]
    parents = {exp_name: parent.info.run_id}
    return SweepRuns(uri, kept, parents, default_metric, objectives, complete=token is None)


def sweep_experiment(sweep: str, storage: str | Path | None) -> str | None:
    """The MLflow experiment a sweep logged to, when its saved spec is at hand (it may be renamed)."""
    if storage is None:
        return None
    spec, _ = load_saved_spec(sweep, storage)
    return spec.experiment


def _census(rows: list[RunRow]) -> str:
    if not rows:
        return "it has no trial runs at all"
    counts: dict[str, int] = {}
    for r in rows:
        state = "stopped early by ASHA" if r.tags.get("cxr.stopped_early") == "true" else r.status
        counts[state] = counts.get(state, 0) + 1
    return f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
