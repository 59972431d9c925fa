"""`cxr-sweep report`: the paper's tables from a sweep's runs (crafted MLflow store)."""

import csv
import math

from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from sweeps.cli import app
from trainer.metrics import METRIC_NAMES, higher_is_better

from . import _results_fixtures as fx

crafted = fx.crafted  # the fixture
runner = CliRunner()

# Which crafted run each cell must come from — chosen on validation F1 by hand (see build_crafted):
# resnet50 λ 0.5 has two runs; r50_half wins on validation (0.81) although r50_half_b is best on test.
CELLS = {
    ("resnet50", "1"): "r50_one",
    ("resnet50", "0.5"): "r50_half",
    ("resnet50", "*"): "r50_adapt",
    ("vgg16", "1"): "vgg_one",
    ("vgg16", "0.5"): "vgg_half",
    ("vgg16", "*"): "vgg_adapt",
}
BEST_ATTENTION = {"resnet50": "r50_half", "vgg16": "vgg_half"}  # 0.81 > 0.78; 0.83 > 0.76 (validation)
METRICS = [*METRIC_NAMES, "pointing_game", "cam_in_region"]


def _report(c, out):
    result = runner.invoke(app, ["report", c.experiment, "--tracking-uri", c.uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_numbers_equal_the_logged_metrics_of_the_runs_chosen_on_validation(crafted, tmp_path):
    _report(crafted, tmp_path)
    detail = _rows(tmp_path / "detail.csv")
    assert len(detail) == len(CELLS) * len(METRICS)
    for row in detail:
        label = CELLS[(row["backbone"], row["lambda"])]
        assert row["run_id"] == crafted.runs[label]
        assert float(row["value"]) == crafted.metrics[label][f"test_{row['metric']}"]  # exact: full precision
        assert row["runs_in_setting"] == ("2" if label == "r50_half" else "1")
    summary = _rows(tmp_path / "summary.csv")
    assert {r["metric"] for r in summary} == {
        "sensitivity",
        "specificity",
        "youden_index",
        "discriminant_power",
        "f1_macro",
        "pointing_game",
        "cam_in_region",
    }
    for row in summary:
        ce, att = CELLS[(row["backbone"], "1")], BEST_ATTENTION[row["backbone"]]
        assert (row["ce_run_id"], row["attention_run_id"]) == (crafted.runs[ce], crafted.runs[att])
        assert float(row["ce"]) == crafted.metrics[ce][f"test_{row['metric']}"]
        assert float(row["attention"]) == crafted.metrics[att][f"test_{row['metric']}"]
        assert row["attention_lambda"] == "0.5"


def test_best_marks_follow_each_metrics_direction(crafted, tmp_path):
    _report(crafted, tmp_path)
    detail = _rows(tmp_path / "detail.csv")
    for metric in METRICS:
        pick = max if higher_is_better(metric) else min
        cells = [r for r in detail if r["metric"] == metric]
        overall = pick(float(r["value"]) for r in cells)
        for backbone in ("resnet50", "vgg16"):
            mine = [r for r in cells if r["backbone"] == backbone]
            best = pick(float(r["value"]) for r in mine)
            for r in mine:
                assert (r["best_in_backbone"] == "True") == (float(r["value"]) == best), (metric, r)
                assert (r["best_overall"] == "True") == (float(r["value"]) == overall), (metric, r)


def test_markdown_latex_and_chart(crafted, tmp_path):
    _report(crafted, tmp_path)
    md = (tmp_path / "report.md").read_text()
    ce, att = crafted.metrics["r50_one"], crafted.metrics["r50_half"]
    yi = f"{ce['test_youden_index']:.3f}/{att['test_youden_index']:.3f}"
    assert f"| Youden's index | {yi} |" in md
    assert "| λ = 1 | λ = 0.5 | λ = * |" in md
    fdr = {lam: crafted.metrics[CELLS[("vgg16", lam)]]["test_fdr"] for lam in ("1", "0.5", "*")}
    best_fdr = min(fdr.values())  # lower is better
    assert f"**{best_fdr:.3f}**" in md.split("| vgg16 | Accuracy")[1].split("| FDR |")[1].splitlines()[0]
    tex = (tmp_path / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\textbf{" in tex and "pvt" not in tex
    assert yi in tex and r"$\lambda = *$" in tex
    with Image.open(tmp_path / "yi_dp.png") as im:
        assert im.size[0] > 500 and im.size[1] > 200


def test_files_are_logged_to_the_sweep_parent_run(crafted, tmp_path):
    result = _report(crafted, tmp_path)
    assert f"parent run {crafted.parent}" in result.output
    names = {a.path for a in MlflowClient(crafted.uri).list_artifacts(crafted.parent, "report")}
    assert names == {
        f"report/{n}" for n in ("report.md", "report.tex", "summary.csv", "detail.csv", "yi_dp.png")
    }


def test_an_unlogged_metric_fails_listing_the_logged_ones(crafted, tmp_path):
    out = tmp_path / "r"
    result = runner.invoke(
        app,
        ["report", crafted.experiment, "--tracking-uri", crafted.uri, "--metric", "auprc", "--out", str(out)],
    )
    assert result.exit_code == 2
    assert "best_val_auprc was never logged" in result.output and "best_val_youden_index" in result.output
    assert not out.exists()


def test_missing_cells_print_as_dashes(crafted, tmp_path):
    runner_args = ["report", crafted.experiment, "--tracking-uri", crafted.uri, "--no-log"]
    filt = "params.`attention.lambda` != '1.0'"  # no CE runs at all
    result = runner.invoke(app, [*runner_args, "--filter", filt, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = _rows(tmp_path / "summary.csv")
    assert all(r["ce"] == "" and r["ce_run_id"] == "" for r in summary)
    assert all(not math.isnan(float(r["attention"])) for r in summary)
    md = (tmp_path / "report.md").read_text()
    assert "| Sensitivity | –/" in md
    for backbone in ("resnet50", "vgg16"):  # said, in the terminal and in the file
        assert f"ne/{backbone}: no CE baseline" in " ".join(result.output.split())
        assert f"> **Missing:** ne/{backbone}: no CE baseline" in md
    assert "points_to_evaluate: [{attention.lambda: 1.0}]" in md


def test_the_report_says_what_lambda_star_means_and_which_mode_won_each_cell(crafted, tmp_path):
    result = _report(crafted, tmp_path)
    assert "warning" not in result.output  # every model has its CE baseline
    md = (tmp_path / "report.md").read_text()
    assert "λ = *: the paper's adaptive schedule" in md and "**Missing:**" not in md
    resnet = md.split("| resnet50 | Accuracy")[1].split("| vgg16 |")[0]
    assert "| | mode | CE | soft | paper |" in resnet  # λ = 1, 0.5, * (r50_half won 0.5 on validation)
    assert "Best attention setting: resnet50: soft, λ = 0.5, threshold 0.5; vgg16: soft, λ = 0.5" in md
    detail = _rows(tmp_path / "detail.csv")
    assert {r["mode"] for r in detail if r["lambda"] == "1"} == {"CE"}
