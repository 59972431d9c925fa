"""Trial commands of ``cxr-sweep``: ``phantoms`` (synthetic data), ``train`` (one trial, logged to
MLflow) and ``demo`` (both, with the embedded defaults)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import console, fail, user_errors

__all__ = ["register"]


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

    with user_errors(ValueError):
        classes = classes_for(task)
        shortcut = (
            None if shortcut_trainval is None else {"trainval": shortcut_trainval, "test": shortcut_test}
        )
        labels = generate(out, n_patients=patients, classes=classes, size=size, seed=seed, shortcut=shortcut)
        console.print(f"phantoms: {labels}")
        if cache is not None:
            path = cache_from_phantoms(out, cache, task, overwrite=overwrite)
            console.print(f"cache: {path}")


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
    with user_errors():
        cfg = TrialConfig.from_file(config, overrides)
    _train_and_log(cfg, resume=resume, tracking_uri=tracking_uri, experiment=experiment, use_mlflow=mlflow)


def _train_and_log(cfg, *, resume: bool, tracking_uri: str | None, experiment: str, use_mlflow: bool) -> dict:
    from trainer import run_trial
    from trainer.checkpoint import STATE_FILE

    resume_from = cfg.output_dir / "checkpoint" if resume else None
    if resume and not (resume_from / STATE_FILE).is_file():
        raise fail(f"--resume: no checkpoint in {resume_from}")
    run = None
    if use_mlflow:
        from ..tracking.runs import TrialRun
        from ..tracking.store import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        try:
            run = TrialRun(uri, experiment, cfg.name, tags={"cxr.kind": "trial"})
        except Exception as e:
            raise fail(f"MLflow tracking store {uri} is not usable: {e}") from None
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

    with user_errors():
        try:
            with progress:
                result = run_trial(cfg, report=report, resume_from=resume_from)
        except BaseException as e:
            if run is not None:
                run.finish(e)
            raise
    if run is not None:
        run.log_result(result)
        run.finish()
    _print_result(result)
    return result


def _print_result(result: dict[str, Any]) -> None:
    from trainer.metrics import LOCALIZATION_METRICS, METRIC_NAMES

    table = Table(title=f"{result['name']}: best epoch {result['best_epoch']} of {result['epochs_run']}")
    table.add_column("metric")
    table.add_column("best val", justify="right")
    table.add_column("test", justify="right")
    for name in (*METRIC_NAMES, *LOCALIZATION_METRICS):
        v, t = result.get(f"best_val_{name}"), result.get(f"test_{name}")
        if v is None and t is None:
            continue
        table.add_row(name, "" if v is None else f"{v:.3f}", "" if t is None else f"{t:.3f}")
    console.print(table)
    console.print(f"model: {result['model_path']}")


def demo(
    workdir: Annotated[Path, typer.Option(help="Where phantoms, cache, runs and mlflow.db go.")] = Path(
        "demo-output"
    ),
    patients: Annotated[int, typer.Option(min=10, help="Synthetic patients.")] = 150,
    size: Annotated[int, typer.Option(min=32, help="Image size.")] = 96,
    epochs: Annotated[int | None, typer.Option(help="Override the demo's epochs.")] = None,
    smoke: Annotated[bool, typer.Option(help="Tiny and fast: for tests.")] = False,
) -> None:
    """One trial on fresh phantoms with the embedded defaults (the demo sweep is `make demo`).

    Generates the phantoms, builds their dataset cache and trains one trial, logged to MLflow."""
    from trainer.config import TrialConfig
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.dotted import apply_overrides

    from ..tracking.store import default_tracking_uri

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


def register(app: typer.Typer) -> None:
    """Add ``phantoms``, ``train`` and ``demo-trial`` to the ``cxr-sweep`` app. ``demo`` (its old
    name, hidden) still works: `make demo` runs the demo *sweep*, this command one trial."""
    for fn in (phantoms, train):
        app.command(fn.__name__)(fn)
    app.command("demo-trial")(demo)
    app.command("demo", hidden=True, help="Old name of demo-trial.")(demo)
