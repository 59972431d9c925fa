"""Bad input through the real command line: exit code 2, one clear message, no traceback, nothing written.

Each case builds its input in ``tmp_path`` and runs one ``cxr-sweep`` command; the message it must
contain is what docs/reliability.md lists. Run with ``-s`` to print every message.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sweeps.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _images(root: Path, n: int = 12, size: int = 16) -> list[dict[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(np.full((size, size), 10 * i, np.uint8)).save(root / f"img{i}.png")
        rows.append(
            {"path": f"img{i}.png", "label": ["No Finding", "Effusion"][i % 2], "patient_id": f"p{i}"}
        )
    return rows


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _prepare_csv(tmp: Path, rows: list[dict[str, str]], *extra: str) -> list[str]:
    csv_path = _write_csv(tmp / "data" / "labels.csv", rows)
    return ["prepare", "csv", "--csv", str(csv_path), "--task", "ne", "--out", str(tmp / "cache"), *extra]


def _corrupt_image(tmp, ctx):
    rows = _images(tmp / "data")
    (tmp / "data" / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return _prepare_csv(tmp, rows, "--segmenter", str(ctx["segmenter"]), "--size", "16")


def _missing_image(tmp, ctx):
    rows = _images(tmp / "data")
    (tmp / "data" / "img4.png").unlink()
    return _prepare_csv(tmp, rows, "--segmenter", str(ctx["segmenter"]), "--size", "16")


def _csv_columns(tmp, ctx):
    rows = [{k: v for k, v in r.items() if k != "patient_id"} for r in _images(tmp / "data")]
    return _prepare_csv(tmp, rows)


def _unknown_label(tmp, ctx):
    rows = _images(tmp / "data")
    rows[5]["label"] = "Efusion"
    return _prepare_csv(tmp, rows)


def _empty_class(tmp, ctx):
    rows = [r for r in _images(tmp / "data") if r["label"] == "Effusion"]
    return _prepare_csv(tmp, rows)


def _patient_overlap(tmp, ctx):
    rows = _images(tmp / "data")
    for i, r in enumerate(rows):
        r["split"] = ["train", "train", "val", "val", "test", "test"][i % 6]
    rows[2]["patient_id"] = rows[0]["patient_id"]  # one patient in train and val
    return _prepare_csv(tmp, rows)


def _escaping_path(tmp, ctx):
    rows = _images(tmp / "data")
    rows[1]["path"] = "../../etc/passwd"
    return _prepare_csv(tmp, rows)


def _duplicate_ids(tmp, ctx):
    rows = _images(tmp / "data")
    rows[3]["image_id"] = rows[2]["image_id"] = "same"
    return _prepare_csv(tmp, rows)


def _train(
    tmp, ctx, *sets: str, config: Path = ROOT / "configs/trial.yaml", cache: Path | None = None
) -> list[str]:
    args = ["train", "--config", str(config), "--set", f"data.cache={cache or ctx['ne_cache']}"]
    for s in ("model.backbone=test_resnet", "train.epochs=1", *sets):
        args += ["--set", s]
    return [*args, "--output-dir", str(tmp / "run"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]


def _lambda_range(tmp, ctx):
    return _train(tmp, ctx, "attention.lambda=1.5")


def _unknown_backbone(tmp, ctx):
    return _train(tmp, ctx, "model.backbone=resnet5000")


def _malformed_yaml(tmp, ctx):
    (tmp / "bad.yaml").write_text("data: {cache: x, task: ne\nmodel: [\n")
    return _train(tmp, ctx, config=tmp / "bad.yaml")


def _wrong_type(tmp, ctx):
    return _train(tmp, ctx, "train.epochs=many")


def _cache_for_another_task(tmp, ctx):
    return _train(tmp, ctx, "data.task=ne", cache=ctx["nep_cache"])


def _checkpoint_other_backbone(tmp, ctx):
    first = runner.invoke(app, _train(tmp, ctx))
    assert first.exit_code == 0, first.output
    return [*_train(tmp, ctx, "model.backbone=test_efficientnet"), "--resume"]


def _unknown_task(tmp, ctx):
    return ["phantoms", "--out", str(tmp / "ph"), "--task", "nx", "--patients", "3"]


def _sweep_lambda_out_of_range(tmp, ctx):
    sets = [
        f"trial.data.cache={ctx['ne_cache']}",
        "params.attention.lambda.fixed={low: -0.5, high: 1.0}",
        f"storage_path={tmp / 'sweeps'}",
    ]
    return [
        "sweep",
        "run",
        str(ROOT / "search_spaces" / "demo.yaml"),
        *[a for s in sets for a in ("--set", s)],
    ]


def _segmenter_mismatch(tmp, ctx):
    rows = _images(tmp / "data")
    return _prepare_csv(tmp, rows, "--segmenter", str(ctx["segmenter"]), "--segmenter-size", "512")


# id → (build the command, text the message must contain, path that must not exist afterwards)
CASES: dict[str, tuple[Callable, str, str | None]] = {
    "corrupt PNG": (_corrupt_image, "img3.png: cannot decode image", "cache"),
    "missing image": (_missing_image, "img4.png: image not found", "cache"),
    "CSV without required columns": (_csv_columns, "missing required column(s) ['patient_id']", "cache"),
    "unknown label": (_unknown_label, "labels.csv:7: unknown label 'Efusion'", "cache"),
    "empty class after filtering": (_empty_class, "no images of class(es) ['No Finding']", "cache"),
    "patient overlap in a given split": (
        _patient_overlap,
        "1 patient(s) appear in more than one split",
        "cache",
    ),
    "path escaping the data root": (_escaping_path, "path '../../etc/passwd' escapes the data root", "cache"),
    "duplicate image ids": (_duplicate_ids, "duplicate image id 'same'", "cache"),
    "segmenter of another input size": (
        _segmenter_mismatch,
        "trained at input size 64 px, but 512 px",
        "cache",
    ),
    "λ outside [0, 1]": (_lambda_range, "lambda must be in [0, 1] or a λ schedule (adaptive", "run"),
    "unknown backbone": (_unknown_backbone, "resnet5000", "run"),
    "malformed YAML": (_malformed_yaml, "bad.yaml", "run"),
    "wrong type": (_wrong_type, "train.epochs", "run"),
    "cache built for another task": (_cache_for_another_task, "built for classes", "run/model.pt"),
    "checkpoint from another backbone": (_checkpoint_other_backbone, "written for a different trial", None),
    "unknown task": (_unknown_task, "unknown task 'nx'", "ph"),
    "search space λ outside [0, 1]": (_sweep_lambda_out_of_range, "params.attention.lambda", "sweeps"),
}


@pytest.fixture(scope="module")
def ctx(ne_cache, nep_cache, quick_segmenter):
    return {"ne_cache": ne_cache, "nep_cache": nep_cache, "segmenter": quick_segmenter}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_error(case, ctx, tmp_path):
    build, expected, must_not_exist = CASES[case]
    result = runner.invoke(app, build(tmp_path, ctx))
    message = result.output.strip()
    print(f"\n[{case}] {message}")
    assert result.exit_code == 2, message
    assert expected in message
    assert "Traceback" not in message
    if must_not_exist:
        assert not (tmp_path / must_not_exist).exists(), f"{must_not_exist} was written"
