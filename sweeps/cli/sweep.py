"""Sweep commands of ``cxr-sweep``: ``sweep run``, ``sweep resume`` and ``sweep status``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from .common import console, short, user_errors

__all__ = ["sweep_app"]

sweep_app = typer.Typer(help="Ray Tune sweeps: run, resume, status.", no_args_is_help=True)

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
) -> None:
    """Run a sweep: every trial in Ray Tune, every trial a child run in MLflow."""
    from ..driver import run_sweep

    overrides = list(set_ or [])
    if smoke:
        overrides = [*_SMOKE, "num_samples=1" if _is_grid(space) else "num_samples=2", *overrides]
    with user_errors():
        outcome = run_sweep(space, address=address, overrides=overrides, overwrite=overwrite)
    _print_sweep(outcome.rows, outcome.name, top)
    console.print(f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id}")
    _print_ui_hint(outcome.tracking_uri)


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
) -> None:
    """Continue an interrupted sweep without re-running finished trials."""
    from ..driver import resume_sweep

    with user_errors():
        outcome = resume_sweep(name, storage=storage, address=address)
    _print_sweep(outcome.rows, outcome.name, 10)
    _print_ui_hint(outcome.tracking_uri)


@sweep_app.command("status")
def sweep_status(
    name: Annotated[str, typer.Argument(help="Sweep name (or its directory).")],
    storage: Annotated[Path | None, typer.Option(help="The sweep's storage_path.")] = None,
) -> None:
    """Show the trials of a sweep: state, params, best metric, GPU."""
    from ..driver.status import read_status

    with user_errors():
        spec, rows = read_status(name, storage=storage)
    _print_sweep(rows, spec.name, len(rows))


def _print_sweep(rows: list[dict[str, Any]], name: str, top: int) -> None:
    order = sorted(
        rows, key=lambda r: (math.isnan(r["best"]), -r["best"] if not math.isnan(r["best"]) else 0)
    )
    states = {s: sum(r["state"] == s for r in rows) for s in ("DONE", "STOPPED", "ERROR", "PENDING")}
    title = f"sweep {name}: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    table = Table(title=title)
    for col in ("trial", "state", "params", "best", "epochs", "GPU", "node"):
        table.add_column(col, justify="right" if col in ("best", "epochs") else "left")
    for r in order[:top]:
        params = ", ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in r["params"].items())
        best = "" if math.isnan(r["best"]) else f"{r['best']:.3f}"
        table.add_row(
            r["trial"], r["state"], params, best, str(r["epochs"]), r["gpu_ids"] or "-", r["node_id"]
        )
    console.print(table)


def _print_ui_hint(uri: str) -> None:
    if uri.startswith("sqlite:"):
        console.print(f"Open the MLflow UI: [bold]mlflow ui --backend-store-uri {uri}[/]")
    else:
        console.print(f"MLflow UI: {uri}")
