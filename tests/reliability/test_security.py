"""What reaches MLflow: never secrets; patient images only from datasets marked public or synthetic.

(The served MLflow refusing unauthenticated requests is proved against a real server in
tests/test_tracking_server.py; paths confined to the data root in tests/test_prepare.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.tracking.runs import TrialRun

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
SECRETS = {
    "CXR_DB_PASSWORD": "pw-0123-secret",
    "AWS_SECRET_ACCESS_KEY": "AKIAsecretvalue99",
    "HF_API_TOKEN": "tok-777-abc",
}


def _train(tmp_path: Path, cache: Path, *sets: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train",
        "--config",
        str(ROOT / "configs/trial.yaml"),
        "--set",
        f"data.cache={cache}",
        "--set",
        "model.backbone=test_resnet",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
        "--tracking-uri",
        uri,
        "--experiment",
        "sec",
    ]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sec").experiment_id])
    return client, run


def _everything_logged(client: MlflowClient, run, tmp_path: Path) -> str:
    """Params, tags, metric names and every text artifact of ``run``, as one string."""
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    for f in local.rglob("*"):
        if f.is_file() and f.suffix in (".yaml", ".json", ".txt", ".csv", ".md"):
            parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


def test_secret_values_never_reach_mlflow(ne_cache, tmp_path, monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    # a user who pastes a secret into a config value: the param is logged masked
    client, run = _train(tmp_path, ne_cache, f"name=run-{SECRETS['CXR_DB_PASSWORD']}")
    logged = _everything_logged(client, run, tmp_path)
    for value in SECRETS.values():
        assert value not in logged
    assert run.data.params["name"] == "run-***"


def test_error_tags_mask_url_passwords_and_secret_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_API_TOKEN", SECRETS["HF_API_TOKEN"])
    run = TrialRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "sec", "failing")
    run.finish(
        RuntimeError(f"cannot reach postgresql://cxr:hunter2@db:5432/mlflow with {SECRETS['HF_API_TOKEN']}")
    )
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["error"] == "RuntimeError: cannot reach postgresql://cxr:***@db:5432/mlflow with ***"


def test_patient_images_leave_only_for_public_or_synthetic_data(ne_cache, tmp_path):
    private = tmp_path / "private_cache"
    shutil.copytree(ne_cache, private)
    header = json.loads((private / "header.json").read_text())
    header["data_access"] = "private"  # not hashed: the content hash covers the arrays and manifest
    (private / "header.json").write_text(json.dumps(header))
    client, run = _train(tmp_path / "p", private)
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/confusion_matrix.png", "plots/roc.png"}  # no Grad-CAM overlays of patients
    assert run.data.tags.get("cxr.data_access", "private") == "private"
    client, run = _train(tmp_path / "s", ne_cache)  # the same on synthetic data: overlays are logged
    assert "plots/gradcam_test.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}


class _RunsCode:
    """A pickle that, loaded the unsafe way, would run code (here: create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_and_segmenters_load_without_running_code(ne_cache, tmp_path):
    import pytest
    import torch

    from tests.conftest import tiny_config
    from trainer.checkpoint import BEST_FILE, STATE_FILE, CheckpointMismatchError
    from trainer.loop import run_trial
    from trainer.segmenter import SegmenterError, load_segmenter

    marker = tmp_path / "code-ran"
    evil = {"format": "cxr-lung-unet/1", "meta": _RunsCode(marker), "state_dict": {}}
    torch.save(evil, tmp_path / "segmenter.pt")
    with pytest.raises(SegmenterError, match="segmenter.pt: not a readable segmenter checkpoint"):
        load_segmenter(tmp_path / "segmenter.pt")
    # a trial resumed from a checkpoint folder someone else wrote
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"identity": _RunsCode(marker)}, ckpt / STATE_FILE)
    torch.save({"state_dict": _RunsCode(marker)}, ckpt / BEST_FILE)
    cfg = tiny_config(ne_cache, tmp_path / "out", train={"epochs": 1})
    with pytest.raises(CheckpointMismatchError, match=r"state.pt: holds objects other than tensors"):
        run_trial(cfg, resume_from=ckpt)
    assert not marker.exists()
    # the files these loaders are given in normal use still load that way
    done = run_trial(tiny_config(ne_cache, tmp_path / "ok", train={"epochs": 1}))
    resumed = run_trial(
        tiny_config(ne_cache, tmp_path / "ok", train={"epochs": 2}),
        resume_from=tmp_path / "ok" / "checkpoint",
    )
    assert done["epochs_run"] == 1 and resumed["epochs_run"] == 2
