import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from trainer.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _train(tmp_path, cache, *extra, config=ROOT / "configs/trial.yaml"):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train",
        "--config",
        str(config),
        "--set",
        f"data.cache={cache}",
        "--set",
        "model.backbone=test_resnet",
        "--set",
        "train.batch_size=32",
        "--epochs",
        "2",
        "--output-dir",
        str(tmp_path / "run"),
        "--tracking-uri",
        uri,
        "--experiment",
        "cli-test",
        *extra,
    ]
    return runner.invoke(app, args), MlflowClient(uri)


def test_train_logs_a_complete_mlflow_run(ne_cache, tmp_path):
    result, client = _train(tmp_path, ne_cache)
    assert result.exit_code == 0, result.output
    exp = client.get_experiment_by_name("cli-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for name in METRIC_NAMES:
        assert f"best_val_{name}" in run.data.metrics, name
        assert f"test_{name}" in run.data.metrics, name
    assert {"test_pointing_game", "test_cam_in_region"} <= run.data.metrics.keys()
    history = client.get_metric_history(run.info.run_id, "val_f1_macro")
    assert sorted(m.step for m in history) == [0, 1]
    assert run.data.params["attention.lambda"] == "0.5"
    assert run.data.params["model.backbone"] == "test_resnet"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert "config.resolved.yaml" in files
    assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/gradcam_test.png"} <= plots


def test_failed_trial_run_ends_failed_with_the_error(nep_cache, tmp_path):
    # the config asks for ne but the cache was built for nep: the run records why it failed
    result, client = _train(tmp_path, nep_cache)
    assert result.exit_code == 2
    assert "asks for" in result.output
    exp = client.get_experiment_by_name("cli-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert "CacheError" in run.data.tags["error"]


def test_bad_config_is_a_clear_error_without_traceback(ne_cache, tmp_path):
    result, _ = _train(tmp_path, ne_cache, "--lambda", "1.5")
    assert result.exit_code == 2
    assert "attention.lambda" in result.output and "Traceback" not in result.output


def test_phantoms_command_builds_a_cache(tmp_path):
    r = runner.invoke(
        app,
        [
            "phantoms",
            "--out",
            str(tmp_path / "ph"),
            "--task",
            "np",
            "--patients",
            "12",
            "--size",
            "48",
            "--cache",
            str(tmp_path / "cache"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cache/header.json").is_file()


@pytest.mark.slow
def test_demo_smoke_through_the_console_script(tmp_path):
    exe = Path(sys.executable).with_name("cxr-sweep")
    r = subprocess.run(
        [str(exe), "demo-trial", "--smoke", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "demo/mlflow.db").is_file()
    assert "mlflow ui --backend-store-uri" in r.stdout


def test_version_and_help_in_plain_words():
    from importlib.metadata import version

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"cxr-sweep {version('cxr-attention-sweeps')}"
    for args in (["sweep", "run", "--help"], ["best", "--help"], ["export", "--help"]):
        out = CliRunner().invoke(app, args, env={"COLUMNS": "100"}).output
        assert "<bool>" not in out and "<str>" not in out and "{" not in out.split("\n\n")[0], out
    out = CliRunner().invoke(app, ["sweep", "run", "--help"], env={"COLUMNS": "100"}).output
    assert "Usage: cxr-sweep sweep run [OPTIONS] SPACE" in out and " INTEGER " in out
