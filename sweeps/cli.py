"""The ``cxr-sweep`` command line."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["app"]

app = typer.Typer(
    name="cxr-sweep",
    help="Sweeps for chest X-ray classifiers trained with a localization-aware attention loss.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown without a traceback, exit code 2."""
    from trainer._registry import UnknownNameError
    from trainer.backbones import BackboneError
    from trainer.config import ConfigError
    from trainer.data.cache import CacheError
    from trainer.loop import CheckpointMismatchError

    return (ConfigError, CacheError, BackboneError, UnknownNameError, CheckpointMismatchError)


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


# ---- phantoms -----------------------------------------------------------------------------------
@app.command()
def phantoms(
    out: Annotated[Path, typer.Option(help="Directory for phantom PNGs, masks and labels.csv.")],
    task: Annotated[str, typer.Option(help="Task whose classes to draw: ne, np, ns, nep, neps.")] = "neps",
    patients: Annotated[int, typer.Option(min=3, help="Number of synthetic patients.")] = 150,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Image size in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cache: Annotated[Path | None, typer.Option(help="Also build a dataset cache for --task here.")] = None,
    shortcut_trainval: Annotated[
        float | None, typer.Option(help="Spurious-marker correlation with the label in train/val (-1..1).")
    ] = None,
    shortcut_test: Annotated[float, typer.Option(help="Marker correlation in the test split.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache.")] = False,
) -> None:
    """Generate synthetic chest X-ray phantoms (and optionally their dataset cache)."""
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.tasks import classes_for

    try:
        classes = classes_for(task)
        shortcut = (
            None if shortcut_trainval is None else {"trainval": shortcut_trainval, "test": shortcut_test}
        )
        labels = generate(out, n_patients=patients, classes=classes, size=size, seed=seed, shortcut=shortcut)
        console.print(f"phantoms: {labels}")
        if cache is not None:
            path = cache_from_phantoms(out, cache, task, overwrite=overwrite)
            console.print(f"cache: {path}")
    except (*_user_errors(), ValueError) as e:
        raise _fail(str(e)) from None


# ---- train --------------------------------------------------------------------------------------
@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="Trial config YAML.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Override model.backbone.")] = None,
    lam: Annotated[
        str | None, typer.Option("--lambda", help="Override attention.lambda (or 'adaptive').")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Override output_dir.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from output_dir/checkpoint.")] = False,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db).")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "cxr-trials",
    mlflow: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
) -> None:
    """Train one trial from a config file, logging to MLflow."""
    from trainer.config import TrialConfig

    overrides = list(set_ or [])
    for key, value in (("train.epochs", epochs), ("model.backbone", backbone), ("attention.lambda", lam)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir.resolve()}")
    try:
        cfg = TrialConfig.from_file(config, overrides)
    except _user_errors() as e:
        raise _fail(str(e)) from None
    _train_and_log(cfg, resume=resume, tracking_uri=tracking_uri, experiment=experiment, use_mlflow=mlflow)


def _train_and_log(cfg, *, resume: bool, tracking_uri: str | None, experiment: str, use_mlflow: bool) -> dict:
    from trainer import run_trial

    resume_from = cfg.output_dir / "checkpoint" if resume else None
    if resume and not (resume_from / "state.pt").is_file():
        raise _fail(f"--resume: no checkpoint in {resume_from}")
    run = None
    if use_mlflow:
        from .tracking import TrialRun, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        try:
            run = TrialRun(uri, experiment, cfg.name, tags={"cxr.kind": "trial"})
        except Exception as e:
            raise _fail(f"MLflow tracking store {uri} is not usable: {e}") from None
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        run.log_config(cfg, cfg.save(cfg.output_dir / "config.resolved.yaml"))
        console.print(f"MLflow run {run.run_id} in experiment {experiment!r} at {uri}")

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    task_id = progress.add_task(cfg.name, total=cfg.train.epochs, status="")
    selection = cfg.train.selection_metric

    def report(metrics: dict[str, float], epoch: int, checkpoint_dir: Path) -> None:
        if run is not None:
            run.log_epoch(metrics, epoch)
        status = (
            f"λ={metrics['lambda']:.2f} loss={metrics['train_loss']:.3f} "
            f"{selection}={metrics[selection]:.3f} auc={metrics['val_auc']:.3f}"
        )
        progress.update(task_id, completed=epoch + 1, status=status)

    try:
        with progress:
            result = run_trial(cfg, report=report, resume_from=resume_from)
    except BaseException as e:
        if run is not None:
            run.finish(e)
        if isinstance(e, _user_errors()):
            raise _fail(str(e)) from None
        raise
    if run is not None:
        run.log_result(result)
        run.finish()
    _print_result(result)
    return result


def _print_result(result: dict[str, Any]) -> None:
    from trainer.metrics import METRIC_NAMES

    table = Table(title=f"{result['name']}: best epoch {result['best_epoch']} of {result['epochs_run']}")
    table.add_column("metric")
    table.add_column("best val", justify="right")
    table.add_column("test", justify="right")
    for name in (*METRIC_NAMES, "pointing_game", "cam_in_region"):
        v, t = result.get(f"best_val_{name}"), result.get(f"test_{name}")
        if v is None and t is None:
            continue
        table.add_row(name, "" if v is None else f"{v:.3f}", "" if t is None else f"{t:.3f}")
    console.print(table)
    console.print(f"model: {result['model_path']}")


# ---- demo ---------------------------------------------------------------------------------------
@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where phantoms, cache, runs and mlflow.db go.")] = Path(
        "demo-output"
    ),
    patients: Annotated[int, typer.Option(min=10, help="Synthetic patients.")] = 150,
    size: Annotated[int, typer.Option(min=32, help="Image size.")] = 96,
    epochs: Annotated[int | None, typer.Option(help="Override the demo's epochs.")] = None,
    smoke: Annotated[bool, typer.Option(help="Tiny and fast: for tests.")] = False,
) -> None:
    """Generate phantoms, build the cache and train one trial with the embedded defaults."""
    from trainer.config import TrialConfig
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.dotted import apply_overrides

    from .tracking import default_tracking_uri

    workdir = workdir.resolve()
    if smoke:
        patients, size, epochs = min(patients, 30), min(size, 64), 1
    raw = yaml.safe_load(resources.files("trainer").joinpath("defaults/demo_trial.yaml").read_text())
    if epochs is not None:
        apply_overrides(raw, [f"train.epochs={epochs}"])
    cfg = TrialConfig.from_dict(raw, source="trainer/defaults/demo_trial.yaml").resolve_paths(base=workdir)
    console.rule("1/2 phantoms and dataset cache")
    phantom_dir = workdir / "phantoms"
    generate(phantom_dir, n_patients=patients, classes=cfg.data.classes, size=size, seed=cfg.train.seed)
    cache_from_phantoms(phantom_dir, cfg.data.cache, cfg.data.task, overwrite=True)
    console.print(f"cache: {cfg.data.cache}")
    console.rule("2/2 one trial")
    uri = default_tracking_uri(workdir)
    _train_and_log(cfg, resume=False, tracking_uri=uri, experiment="cxr-demo", use_mlflow=True)
    console.print(f"Open the MLflow UI: [bold]mlflow ui --backend-store-uri {uri}[/]")


# ---- sweeps ---------------------------------------------------------------------------------------
sweep_app = typer.Typer(help="Ray Tune sweeps: run, resume, status.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")

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
    from .driver import run_sweep

    overrides = list(set_ or [])
    if smoke:
        overrides = [*_SMOKE, "num_samples=1" if _is_grid(space) else "num_samples=2", *overrides]
    try:
        outcome = run_sweep(space, address=address, overrides=overrides, overwrite=overwrite)
    except _user_errors() as e:
        raise _fail(str(e)) from None
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
    from .driver import resume_sweep

    try:
        outcome = resume_sweep(name, storage=storage, address=address)
    except _user_errors() as e:
        raise _fail(str(e)) from None
    _print_sweep(outcome.rows, outcome.name, 10)
    _print_ui_hint(outcome.tracking_uri)


@sweep_app.command("status")
def sweep_status(
    name: Annotated[str, typer.Argument(help="Sweep name (or its directory).")],
    storage: Annotated[Path | None, typer.Option(help="The sweep's storage_path.")] = None,
) -> None:
    """Show the trials of a sweep: state, params, best metric, GPU."""
    from .driver import read_status

    try:
        spec, rows = read_status(name, storage=storage)
    except _user_errors() as e:
        raise _fail(str(e)) from None
    _print_sweep(rows, spec.name, len(rows))


def _print_sweep(rows: list[dict[str, Any]], name: str, top: int) -> None:
    import math

    order = sorted(
        rows, key=lambda r: (math.isnan(r["best"]), -r["best"] if not math.isnan(r["best"]) else 0)
    )
    states = {s: sum(r["state"] == s for r in rows) for s in ("DONE", "STOPPED", "ERROR", "PENDING")}
    title = f"sweep {name}: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    table = Table(title=title)
    for col in ("trial", "state", "params", "best", "epochs", "GPU", "node"):
        table.add_column(col, justify="right" if col in ("best", "epochs") else "left")
    for r in order[:top]:
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["params"].items())
        best = "" if math.isnan(r["best"]) else f"{r['best']:.3f}"
        table.add_row(
            r["trial"], r["state"], params, best, str(r["epochs"]), r["gpu_ids"] or "-", r["node_id"]
        )
    console.print(table)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _print_ui_hint(uri: str) -> None:
    if uri.startswith("sqlite:"):
        console.print(f"Open the MLflow UI: [bold]mlflow ui --backend-store-uri {uri}[/]")
    else:
        console.print(f"MLflow UI: {uri}")


# ---- commands defined in their own modules (data preparation; results: best/report/export/...) ---
def _register_more() -> None:
    from . import cli_data, cli_results

    cli_data.register(app)
    cli_results.register(app)


_register_more()
