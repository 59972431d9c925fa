"""`cxr-sweep predict`: an exported model on a folder of images gives the original model's outputs."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.results.export import load_trained
from sweeps.results.formats import load_torchscript
from sweeps.results.predict import ScriptedBackbone, preprocess
from trainer.cam import grad_cam

from . import _results_fixtures as fx

real_sweep, real_export = fx.real_sweep, fx.real_export  # the fixtures
pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def original(real_sweep, real_export):
    """The exported run's model, rebuilt from its model.pt as export does."""
    meta = json.loads((real_export / "export.json").read_text())
    run = MlflowClient(real_sweep.uri).get_run(meta["run_id"])
    model, _ = load_trained(run.data.tags["cxr.model_uri"])
    return model, meta


@pytest.fixture
def images(real_sweep, tmp_path):
    """Nine phantom PNGs (three in a subfolder) and one at 2× size: the box resize brings it back."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    src = sorted((real_sweep.phantoms / "images").glob("*.png"))[:10]
    for i, p in enumerate(src[:9]):
        shutil.copy(p, folder / ("sub" if i % 3 == 0 else "") / p.name)
    with Image.open(src[9]) as im:
        im.convert("L").resize((128, 128), Image.Resampling.BICUBIC).save(folder / "large.png")
    return folder


def _expected_gray(folder, names, size):
    out = []
    for n in names:
        with Image.open(folder / n) as im:
            g = im.convert("L")
            out.append(
                np.asarray(g if g.size == (size, size) else g.resize((size, size), Image.Resampling.BOX))
            )
    return np.stack(out)


def test_predict_matches_the_original_model(original, real_export, images, tmp_path):
    model, meta = original
    out = tmp_path / "pred"
    result = runner.invoke(
        app, ["predict", "--model", str(real_export), "--images", str(images), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["image"] for r in rows]
    assert len(names) == 10 and "sub/" + sorted((images / "sub").iterdir())[0].name in names
    probs = np.array([[float(r[f"p_{c}"]) for c in meta["classes"]] for r in rows])

    x = preprocess(_expected_gray(images, names, 64), meta)  # the training preprocessing, by hand
    with torch.no_grad():
        logits, cam = grad_cam(model, x, "predicted")  # (10, 2), (10, 1, 64, 64)
    np.testing.assert_allclose(probs, logits.softmax(1).numpy(), atol=1e-6, rtol=0)
    assert [r["predicted"] for r in rows] == [meta["classes"][k] for k in logits.argmax(1)]
    saved = np.load(out / "cams.npz")
    assert list(saved["names"]) == names
    np.testing.assert_allclose(saved["cams"], cam[:, 0].numpy(), atol=1e-5, rtol=0)
    for n in names:  # readable overlays: 512 px, the prediction written in a black box, top left
        with Image.open((out / "cam" / n).with_suffix(".png")) as im:
            assert im.size == (512, 512) and im.mode == "RGB"
            corner = np.asarray(im)[:24, :120]  # a CAM blend is never pure black or pure white
            assert (corner == 0).all(axis=2).any() and (corner == 255).all(axis=2).any()


def test_scripted_grad_cam_equals_the_original_for_every_target_class(original, real_export, real_sweep):
    model, meta = original
    scripted = ScriptedBackbone(load_torchscript(real_export / "model.torchscript.pt"), meta)
    gray = _expected_gray(real_sweep.phantoms / "images", [f"ph{i:06d}.png" for i in range(12)], 64)
    x = preprocess(gray, meta)
    with torch.no_grad():
        feats = model.forward_features(x)  # (12, C, h, w)
        assert (scripted.forward_features(x) - feats).abs().max() <= 1e-5
    for k in range(len(meta["classes"])):
        # what Grad-CAM is made of: d(logit k)/d(features) through each head, on the same features
        grads = []
        for backbone in (scripted, model):
            f = feats.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(backbone.forward_head(f)[:, k].sum(), f)
            grads.append(g)
        assert grads[1].abs().max() > 0  # all-zero gradients would prove nothing
        assert (grads[0] - grads[1]).abs().max() <= 1e-6
        target = torch.full((len(x),), k)
        with torch.no_grad():
            assert (grad_cam(scripted, x, target)[1] - grad_cam(model, x, target)[1]).abs().max() <= 1e-5


def test_onnx_runtime_serves_probabilities(original, real_export, images, tmp_path):
    model, meta = original
    out = tmp_path / "onnx"
    args = ["predict", "--model", str(real_export / "model.onnx"), "--images", str(images), "--out", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--no-cam" in refused.output and not out.exists()
    result = runner.invoke(app, [*args, "--no-cam"])
    assert result.exit_code == 0, result.output
    assert "probabilities from onnx" in result.output
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = preprocess(_expected_gray(images, [r["image"] for r in rows], 64), meta)
    with torch.no_grad():
        expected = model(x).softmax(1).numpy()
    got = np.array([[float(r[f"p_{c}"]) for c in meta["classes"]] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert not (out / "cam").exists()


def test_bad_input(real_export, images, tmp_path):
    def predict(model, folder, out):
        return runner.invoke(
            app, ["predict", "--model", str(model), "--images", str(folder), "--out", str(out)]
        )

    (images / "sub" / "broken.png").write_bytes(b"not a png")
    broken = predict(real_export, images, tmp_path / "o1")
    assert broken.exit_code == 2 and "broken.png: cannot decode image" in broken.output
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1.tmp-*"))
    (tmp_path / "empty").mkdir()
    empty = predict(real_export, tmp_path / "empty", tmp_path / "o2")
    assert empty.exit_code == 2 and "no images" in empty.output
    not_export = predict(images, images, tmp_path / "o3")
    assert not_export.exit_code == 2 and "not an export folder" in not_export.output
