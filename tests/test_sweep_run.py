"""Sweeps for real: Ray Tune on this machine with fake GPUs, MLflow on a sqlite file."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.driver import SweepFailed, run_sweep

from .conftest import peak_trials_per_gpu, sweep_overrides, sweep_runs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_with_fake_gpus():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


def _small(cache: Path, storage: Path, **extra) -> list[str]:
    return sweep_overrides(cache, storage, **extra)


def _runs(storage: Path, experiment: str):
    return sweep_runs(f"sqlite:///{storage / 'mlflow.db'}", experiment)


@pytest.mark.parametrize("space", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_space_runs_through_the_cli(space, ne_cache, tmp_path):
    # the paper's backbones at 224 px are covered by test_backbones; here the grid runs tiny models
    if space.name == "paper_grid.yaml":
        extra = {"params.model.backbone.values": "[test_resnet]"}
    else:
        extra = {"trial.model.backbone": "test_resnet"}
    if space.name == "decision.yaml":  # the trial after the CE baseline trains the new guidance
        extra |= {
            "params.attention.mode.values": "[input_grad]",
            "params.outside.augment.values": "[0.0, 0.5]",
        }
    args = ["sweep", "run", str(space), "--smoke"]
    for s in _small(ne_cache, tmp_path, **extra):
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    name = {
        "demo.yaml": "demo",
        "paper_grid.yaml": "paper-grid-ne",
        "optuna_lambda.yaml": "optuna-lambda-ne",
        "shortcut.yaml": "shortcut-ne-search",
        "decision.yaml": "decision-ne",
    }
    client, parents, children = _runs(tmp_path, name[space.name])
    expected = 5 if space.name == "paper_grid.yaml" else 2
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == expected
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("error")
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "test_f1_macro" in run.data.metrics and "test_discriminant_power" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1_macro")] == [0]
    if space.name == "demo.yaml":  # its first trial is the CE baseline; names say what each run is
        names = sorted(r.info.run_name for r in children)
        assert re.fullmatch(r"CE λ=1 \[\w+\]", names[0]), names
        assert re.fullmatch(r"soft λ=([\d.]+|adaptive) t=[\d.]+ τ=0\.1 \[\w+\]", names[1]), names
        ce = next(r for r in children if r.info.run_name.startswith("CE"))
        assert ce.data.params["attention.lambda"] == "1.0"
        unused = {"attention.threshold", "attention.mode", "attention.tau", "search.attention.threshold"}
        assert not unused & set(ce.data.params)  # only what takes effect in a CE run
        assert not any(k.startswith("attention.schedule") for k in ce.data.params)
    if space.name == "decision.yaml":
        modes = sorted(r.data.params.get("attention.mode", "CE") for r in children)
        assert modes == ["CE", "input_grad"], modes
        assert all("best_val_outside_evidence" in r.data.metrics for r in children)
    if space.name == "paper_grid.yaml":
        combos = {(r.data.params["model.backbone"], r.data.params["attention.lambda"]) for r in children}
        assert {lam for _, lam in combos} == {"1.0", "0.75", "0.5", "0.25", "adaptive"}


def test_fractional_gpus_pack_two_trials_per_gpu(ne_cache, tmp_path):
    sets = _small(
        ne_cache,
        tmp_path,
        **{
            "resources.gpu": "0.5",
            "resources.cpu": "0.25",
            "max_concurrent_trials": "8",
            "num_samples": "6",
            "trial.model.backbone": "test_resnet",
            "trial.train.epochs": "2",
            "scheduler.type": "fifo",
        },
    )
    outcome = run_sweep(ROOT / "search_spaces/demo.yaml", overrides=sets)
    assert len(outcome.rows) == 6
    client, _, children = _runs(tmp_path, "demo")
    assert all(r.data.tags["ray.gpu_ids"] in ("0", "1") for r in children)  # one (fractional) fake GPU each
    peak = peak_trials_per_gpu(children)
    assert max(peak.values()) == 2, peak  # 0.5 GPU each: two share a GPU, never three


def test_eight_concurrent_trials_lose_no_metrics(ne_cache, tmp_path):
    sets = _small(
        ne_cache,
        tmp_path,
        **{
            "resources.cpu": "0.25",
            "max_concurrent_trials": "8",
            "num_samples": "8",
            "trial.model.backbone": "test_resnet",
            "trial.train.epochs": "2",
            "scheduler.type": "fifo",
        },
    )
    outcome = run_sweep(ROOT / "search_spaces/demo.yaml", overrides=sets)
    client, _, children = _runs(tmp_path, "demo")
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    stored = 0
    for run in children:
        for key in run.data.metrics:
            stored += len(client.get_metric_history(run.info.run_id, key))
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    assert stored == outcome.metrics_logged  # every logged value is in the store: none lost
    assert outcome.metrics_logged > 8 * 2 * 30


def test_failed_trial_ends_failed_with_the_error(ne_cache, tmp_path):
    sets = _small(
        ne_cache,
        tmp_path,
        **{
            "trial.model.backbone": "test_vit",
            "trial.model.image_size": "50",  # not a multiple of the 16 px patch: fails in the trial
            "num_samples": "1",
            "max_failures": "0",
        },
    )
    with pytest.raises(
        SweepFailed, match="every trial of sweep 'demo' failed; trial .*cannot take 50x50"
    ) as e:
        run_sweep(ROOT / "search_spaces/demo.yaml", overrides=sets)
    assert [r["state"] for r in e.value.rows] == ["ERROR"]
    _, parents, children = _runs(tmp_path, "demo")
    (run,) = children
    assert run.info.status == "FAILED"
    assert "cannot take 50x50" in run.data.tags["error"]
    assert run.data.tags["error_type"] == "BackboneError"
    assert parents[0].data.metrics["trials_failed"] == 1
    assert parents[0].info.status == "FAILED" and "every trial failed" in parents[0].data.tags["error"]


def test_status_and_resume_of_a_finished_sweep(ne_cache, tmp_path):
    sets = _small(ne_cache, tmp_path, **{"trial.model.backbone": "test_resnet", "num_samples": "2"})
    runner.invoke(
        app,
        [
            "sweep",
            "run",
            str(ROOT / "search_spaces/demo.yaml"),
            "--smoke",
            *[arg for s in sets for arg in ("--set", s)],
        ],
    )
    status = runner.invoke(app, ["sweep", "status", "demo", "--storage", str(tmp_path)])
    assert status.exit_code == 0, status.output
    assert status.output.count("DONE") == 2
    # Tune tracks only the values it schedules on (per trial, the sweep long); MLflow gets them all
    from sweeps.driver.status import saved_trials

    _, _, children = _runs(tmp_path, "demo")
    for trial in saved_trials(str(tmp_path / "demo")):
        tracked = set(trial.run_metadata.metric_analysis)
        assert {k for k in tracked if k.startswith(("val_", "test_", "train_"))} == {"val_f1_macro"}, tracked
        assert {"best_val_f1_macro", "epochs_done"} <= tracked
    assert all({"val_auc", "train_loss", "test_f1_macro"} <= set(c.data.metrics) for c in children)
    resumed = runner.invoke(app, ["sweep", "resume", "demo", "--storage", str(tmp_path)])
    assert resumed.exit_code == 0, resumed.output
    _, parents, children = _runs(tmp_path, "demo")
    assert len(parents) == 1 and len(children) == 2  # nothing re-run, no duplicate runs
    # the resumed Tuner runs this driver's callbacks, not the copies Ray pickled with the experiment
    # (the driver reads its storage guard's `full` and settles its tracking writer)
    from ray import tune

    from sweeps.driver.checkpoints import MissingCheckpoints
    from sweeps.driver.tuner import build_tuner
    from sweeps.space import load_saved_spec

    mine = tune.Callback()
    spec, _ = load_saved_spec("demo", tmp_path)
    running = build_tuner(spec, [mine], restore=True)._local_tuner.get_run_config().callbacks
    assert mine in running and isinstance(running[0], MissingCheckpoints), running
    missing = runner.invoke(app, ["sweep", "status", "nope", "--storage", str(tmp_path)])
    assert missing.exit_code == 2 and "no sweep 'nope'" in missing.output
