"""`cxr-sweep export`: TorchScript and ONNX that reproduce PyTorch's logits, a model card, the registry."""

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.results import formats
from sweeps.results.export import ExportError, export_model, load_trained, parse_formats
from sweeps.results.formats import load_torchscript
from trainer.data.cache import CacheDataset, collate_batch, open_cache
from trainer.data.transforms import BatchTransform

from . import _results_fixtures as fx

real_sweep = fx.real_sweep  # the fixture
pytestmark = pytest.mark.slow
runner = CliRunner()


def _ranked(sweep):
    result = runner.invoke(app, ["best", sweep.name, "--storage", str(sweep.storage), "--json", "--top", "9"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _test_images(sweep, start: int, n: int) -> torch.Tensor:
    """Test-split images of the sweep's cache, preprocessed as evaluation does — not the export's batch."""
    ds = CacheDataset(open_cache(sweep.cache, verify=False), "test")
    batch = collate_batch(ds.__getitems__(list(range(start, start + n))))
    return BatchTransform("cpu", size=64)(batch)["image"]  # (n, 3, 64, 64)


def test_export_best_run_reproduces_logits_writes_a_card_and_registers(real_sweep, tmp_path):
    out = tmp_path / "export"
    best_id = _ranked(real_sweep)[0]["run_id"]
    trial = MlflowClient(real_sweep.uri).get_run(best_id).info  # as the sweep ended it
    args = ["export", real_sweep.name, "--storage", str(real_sweep.storage), "--out", str(out)]
    result = runner.invoke(app, [*args, "--format", "torchscript,onnx", "--name", "cxr-test-model"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "export.json").read_text())
    best = _ranked(real_sweep)[0]
    assert meta["run_id"] == best["run_id"]  # the run `best` picks on validation
    assert max(meta["max_abs_logit_diff"].values()) <= 1e-4
    assert meta["cam_target_layer"] == "layer4" and meta["classes"] == ["No Finding", "Effusion"]
    assert meta["cam_score"] == "logit"  # the trial's attention.cam_score: predict's CAMs use it

    # an independent check on other images and another batch size (7): the batch axis is dynamic
    run = MlflowClient(real_sweep.uri).get_run(best["run_id"])
    model, _ = load_trained(run.data.tags["cxr.model_uri"])
    x = _test_images(real_sweep, 3, 7)
    with torch.no_grad():
        reference = model(x)
        scripted = load_torchscript(out / "model.torchscript.pt")(x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (scripted - reference).abs().max() <= 1e-4
    assert np.abs(onnx_logits - reference.numpy()).max() <= 1e-4

    card = (out / "model_card.md").read_text()
    header = json.loads((real_sweep.cache / "header.json").read_text())
    assert header["content_hash"] in card and "Not a medical device" in card and "layer4" in card
    for name in ("youden_index", "discriminant_power"):
        v, t = best["metrics"][f"best_val_{name}"], best["metrics"][f"test_{name}"]
        assert f"| {name} | {v:.4f} | {t:.4f} |" in card
    assert "selection_metric: val_f1_macro" in card  # the training config

    client = MlflowClient(real_sweep.uri, registry_uri=real_sweep.uri)
    (version,) = client.search_model_versions("name='cxr-test-model'")
    assert version.run_id == best["run_id"]
    assert version.tags["test_youden_index"] == repr(best["metrics"]["test_youden_index"])
    assert version.tags["best_val_f1_macro"] == repr(best["metrics"]["best_val_f1_macro"])
    import mlflow.pytorch

    registered = mlflow.pytorch.load_model(
        client.get_model_version_download_uri("cxr-test-model", version.version)
    )
    with torch.no_grad():
        assert (registered(x) - reference).abs().max() <= 1e-4  # pt2 program, dynamic batch
    arts = {a.path for a in client.list_artifacts(best["run_id"], "export")}
    assert arts == {"export/model_card.md", "export/export.json"}
    after = client.get_run(best["run_id"]).info  # logging the model into the run did not restamp it
    assert (after.status, after.end_time) == (trial.status, trial.end_time)
    assert f"(epoch {meta['best_epoch']}, counted from 0)" in card


def test_export_by_run_id_without_registry(real_sweep, tmp_path):
    other = _ranked(real_sweep)[1]["run_id"]  # not the best: a run id picks exactly that run
    args = ["export", other, "--tracking-uri", real_sweep.uri, "--out", str(tmp_path / "e")]
    result = runner.invoke(app, [*args, "--format", "onnx", "--no-register"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "e/export.json").read_text())
    assert meta["run_id"] == other and meta["formats"] == ["onnx"]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "export.json",
        "model.onnx",
        "model_card.md",
    ]


def test_a_mismatching_export_fails_and_leaves_nothing(real_sweep, tmp_path, monkeypatch):
    real_run = formats.run_onnx
    monkeypatch.setattr(formats, "run_onnx", lambda path, x: real_run(path, x) + 1e-3)
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match=r"onnx: exported logits differ from PyTorch by 0.001 > 0.0001"):
        export_model(
            real_sweep.name, ["torchscript", "onnx"], out, storage=real_sweep.storage, register=False
        )
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--format", "torchscript,tflite"],
            "unsupported export format(s) ['tflite']; supported: torchscript, onnx",
        ),
        (["--format", ""], "unsupported export format"),
    ],
)
def test_unsupported_format(real_sweep, tmp_path, args, message):
    result = runner.invoke(app, ["export", real_sweep.name, "--storage", str(real_sweep.storage), *args])
    assert result.exit_code == 2 and message in result.output


def test_unknown_run_sweep_and_existing_output(real_sweep, tmp_path):
    unknown = runner.invoke(app, ["export", "0" * 32, "--tracking-uri", real_sweep.uri])
    assert unknown.exit_code == 2 and f"unknown run id '{'0' * 32}'" in unknown.output
    no_sweep = runner.invoke(app, ["export", "nope", "--storage", str(real_sweep.storage)])
    assert no_sweep.exit_code == 2 and "no sweep 'nope'" in no_sweep.output
    (tmp_path / "taken").mkdir()
    taken = runner.invoke(
        app,
        ["export", real_sweep.name, "--storage", str(real_sweep.storage), "--out", str(tmp_path / "taken")],
    )
    assert taken.exit_code == 2 and "already exists" in taken.output
    assert parse_formats("ONNX, torchscript,onnx") == ["onnx", "torchscript"]


def test_a_single_trial_from_cxr_sweep_train_exports_by_run_id(ne_cache, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"data.cache={ne_cache}", "model.backbone=test_resnet", "train.batch_size=32"]
    train = runner.invoke(
        app,
        ["train", "--config", str(fx.ROOT / "configs/trial.yaml"), "--epochs", "1", "--tracking-uri", uri]
        + [arg for s in sets for arg in ("--set", s)]
        + ["--output-dir", str(tmp_path / "run")],
    )
    assert train.exit_code == 0, train.output
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("cxr-trials").experiment_id]
    )
    assert run.data.tags["cxr.model_uri"] == str(tmp_path / "run/model.pt")
    assert (
        run.data.tags["cxr.cache_hash"] == json.loads((ne_cache / "header.json").read_text())["content_hash"]
    )
    args = ["export", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "e"), "--no-register"]
    result = runner.invoke(app, [*args, "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "e/export.json").read_text())
    assert meta["run_id"] == run.info.run_id and meta["max_abs_logit_diff"]["torchscript"] <= 1e-4


def test_onnx_falls_back_to_the_torchscript_exporter(real_sweep, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("torch.export cannot capture this model")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    result = export_model(
        real_sweep.name, ["onnx"], tmp_path / "e", storage=real_sweep.storage, register=False
    )
    assert result.meta["onnx_exporter"] == "torchscript" and result.max_abs_diff["onnx"] <= 1e-4
