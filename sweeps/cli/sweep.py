"""Sweep commands of ``cxr-sweep``: ``sweep run``, ``resume`` and ``status``, and for a cluster reached
from a workstation through Ray's Jobs API, ``sweep submit``, ``logs`` and ``stop``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from .common import (
    EXIT_INTERRUPTED,
    TableColumn,
    console,
    err_console,
    param_lines,
    print_table,
    quiet_libraries,
    user_errors,
)
from .live import LiveSweep

__all__ = ["sweep_app"]

sweep_app = typer.Typer(
    help="Ray Tune sweeps: run, resume, status; submit, logs, stop.", no_args_is_help=True
)

_SMOKE = ["trial.train.epochs=1"]


@sweep_app.command("run")
def sweep_run(
    space: Annotated[Path, typer.Argument(help="Search-space YAML (search_spaces/*.yaml).")],
    address: Annotated[
        str | None, typer.Option(help="Ray cluster: auto, host:port or ray://host:10001 (default: local).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a sweep field: key.sub=value (repeatable).")
    ] = None,
    smoke: Annotated[
        bool, typer.Option(help="One epoch per trial and at most 2 samples: a quick check.")
    ] = False,
    top: Annotated[int, typer.Option(help="Rows in the summary table.")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished sweep of the same name.")] = False,
    verbose: _Verbose = False,
    every: _Every = 30.0,
) -> None:
    """Run a sweep: every trial in Ray Tune, every trial a child run in MLflow."""
    quiet_libraries(verbose)
    from ..driver import run_sweep

    overrides = list(set_ or [])
    if smoke:
        overrides = [*_SMOKE, "num_samples=1" if _is_grid(space) else "num_samples=2", *overrides]
    with _sweep_ending(), LiveSweep(every) as live:
        outcome = run_sweep(space, address=address, overrides=overrides, overwrite=overwrite, watch=live)
    _print_sweep(outcome.rows, outcome.name, top, outcome.mode)
    console.print(f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id}")
    _print_next(outcome)


_Verbose = Annotated[
    bool, typer.Option("--verbose", help="Let Ray, Optuna and MLflow print their own logs and tracebacks.")
]
_Every = Annotated[
    float, typer.Option(help="Seconds between status lines when the output is not a terminal (CI logs).")
]


@contextlib.contextmanager
def _sweep_ending() -> Iterator[None]:
    """How a sweep that does not finish ends: bad input or a late failure, one line and exit 2;
    an interruption, the trials so far, the command that continues it, and exit 130."""
    from ..driver import SweepFailed, SweepInterrupted

    try:
        with user_errors():
            try:
                yield
            except SweepFailed as e:
                if e.log is None and e.rows:  # every trial failed: which, and why
                    _print_sweep(e.rows, e.name, len(e.rows), e.mode)
                raise
    except SweepInterrupted as e:
        if e.rows:
            _print_sweep(e.rows, e.name, len(e.rows), e.mode)
        err_console.print(f"interrupted: continue with [bold]{e.resume}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        err_console.print("interrupted before any trial started", highlight=False)
        raise typer.Exit(code=EXIT_INTERRUPTED) from None


def _is_grid(space: Path) -> bool:
    try:
        raw = yaml.safe_load(space.read_text())
        return raw.get("search", {}).get("algorithm") == "grid"
    except (OSError, yaml.YAMLError, AttributeError):
        return False


@sweep_app.command("resume")
def sweep_resume(
    name: Annotated[str, typer.Argument(help="Sweep name (or its directory).")],
    storage: Annotated[Path | None, typer.Option(help="The sweep's storage_path.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    verbose: _Verbose = False,
    every: _Every = 30.0,
) -> None:
    """Continue an interrupted sweep without re-running finished trials."""
    quiet_libraries(verbose)
    from ..driver import resume_sweep

    with _sweep_ending(), LiveSweep(every) as live:
        outcome = resume_sweep(name, storage=storage, address=address, watch=live)
    _print_sweep(outcome.rows, outcome.name, 10, outcome.mode)
    _print_next(outcome)


@sweep_app.command("status")
def sweep_status(
    name: Annotated[str, typer.Argument(help="Sweep name (or its directory).")],
    storage: Annotated[Path | None, typer.Option(help="The sweep's storage_path.")] = None,
    address: _JobsAddress = None,
) -> None:
    """Show the trials of a sweep: state, params, best metric, GPU; with --address, its job and progress."""
    if address:
        from ..driver.jobs import job_logs

        with user_errors():
            job, log = job_logs(name, address)
        console.print(
            f"sweep {name}: job {job.submission_id} {job.status} {job.message}".rstrip(), soft_wrap=True
        )
        lines = [ln for ln in log.splitlines() if ln.strip()]
        progress = [ln for ln in lines if ln.startswith(f"sweep {name}")]
        tail = lines[lines.index(progress[-1]) :] if progress else lines[-5:]
        console.print("\n".join(tail[:40]), markup=False, highlight=False, soft_wrap=True)
        return
    from ..driver.status import read_status

    with user_errors():
        spec, rows = read_status(name, storage=storage)
    _print_sweep(rows, spec.name, len(rows), spec.mode)


_JobsAddress = Annotated[
    str | None, typer.Option(help="The Ray dashboard of the cluster: http://HEAD:8265 (Jobs API).")
]


@sweep_app.command("submit")
def sweep_submit(
    space: Annotated[Path, typer.Argument(help="Search-space YAML; its paths are the cluster's.")],
    address: Annotated[str, typer.Option(help="The Ray dashboard of the cluster: http://HEAD:8265.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a sweep field: key.sub=value (repeatable).")
    ] = None,
    smoke: Annotated[bool, typer.Option(help="One epoch per trial and at most 2 samples.")] = False,
) -> None:
    """Run a sweep's driver on the cluster as a Ray job: it goes on when this machine sleeps."""
    from ..driver.jobs import submit_sweep

    extra = [*_SMOKE, "num_samples=1" if _is_grid(space) else "num_samples=2"] if smoke else []
    with user_errors():
        job = submit_sweep(space, address, overrides=list(set_ or []), smoke=extra)
    console.print(f"submitted sweep {job.sweep} as job {job.submission_id}", soft_wrap=True)
    for verb in ("logs", "status", "stop"):
        console.print(
            f"  cxr-sweep sweep {verb} {job.sweep} --address {address}", markup=False, soft_wrap=True
        )


@sweep_app.command("logs")
def sweep_logs(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    address: Annotated[str, typer.Option(help="The Ray dashboard of the cluster: http://HEAD:8265.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """The driver's output of a submitted sweep (its newest job)."""
    from ..driver.jobs import follow_logs, job_logs

    with user_errors():
        if not follow:
            console.print(job_logs(name, address)[1], end="", markup=False, highlight=False, soft_wrap=True)
            return
        for chunk in follow_logs(name, address):
            console.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)


@sweep_app.command("stop")
def sweep_stop(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    address: Annotated[str, typer.Option(help="The Ray dashboard of the cluster: http://HEAD:8265.")],
) -> None:
    """Stop a submitted sweep as a Ctrl-C would: its trials end, and `sweep resume` continues it."""
    from ..driver.jobs import stop_job

    with user_errors():
        job = stop_job(name, address)
    console.print(
        f"stopping sweep {name} (job {job.submission_id}); continue it with `sweep resume` on the cluster"
    )


def _print_sweep(rows: list[dict[str, Any]], name: str, top: int, mode: str = "max") -> None:
    """The trials best first (in the metric's direction), then those with no value yet."""
    from ..driver.status import STATES

    sign = -1.0 if mode == "max" else 1.0
    order = sorted(
        rows, key=lambda r: (math.isnan(r["best"]), sign * r["best"] if not math.isnan(r["best"]) else 0)
    )
    states = {s: sum(r["state"] == s for r in rows) for s in STATES}
    title = f"sweep {name}: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    columns = [TableColumn("trial"), TableColumn("state"), TableColumn("best", "right")]
    columns += [TableColumn("epochs", "right", 1), TableColumn("params")]
    columns += [TableColumn("GPU", drop=2), TableColumn("node", drop=3)]
    table = []
    for r in order[:top]:
        best = "" if math.isnan(r["best"]) else f"{r['best']:.3f}"
        cells = [r["trial"], r["state"], best, str(r["epochs"]), param_lines(r["params"])]
        table.append([*cells, r["gpu_ids"] or "-", r["node_id"]])
    print_table(title, columns, table)


def _print_next(outcome) -> None:
    """The commands that read the sweep next, ready to paste (the store may be a remote server)."""
    import shlex

    where = f"{shlex.quote(outcome.name)} --storage {shlex.quote(str(Path(outcome.path).parent))}"
    console.print(f"Best trials: [bold]cxr-sweep best {where}[/]", soft_wrap=True)
    console.print(f"Against CE:  [bold]cxr-sweep compare {where}[/]", soft_wrap=True)
    if outcome.tracking_uri.startswith("sqlite:"):
        console.print(f"MLflow UI:   [bold]cxr-sweep ui {where}[/]", soft_wrap=True)
    else:
        console.print(f"MLflow UI:   {outcome.tracking_uri}", soft_wrap=True)
