"""Multi-objective sweeps: metric as a list, the Pareto front, and the whole path through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sweeps.results.select import pareto_front
from sweeps.space import load_sweep
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


def test_the_front_of_a_fixed_set_is_exactly_the_non_dominated_points():
    points = [
        (0.90, 0.20),  # 0: best F1: on the front
        (0.80, 0.50),  # 1: on the front
        (0.70, 0.50),  # 2: beaten by 1 (equal y, lower x)
        (0.60, 0.70),  # 3: best localization: on the front
        (0.55, 0.40),  # 4: beaten by 1 and 3
        (0.80, 0.50),  # 5: equal to 1: kept with it
        (math.nan, 0.99),  # 6: a NaN is never on the front
        (0.10, 0.10),  # 7: beaten by everyone
    ]
    assert pareto_front(points, [True, True]) == [0, 1, 3, 5]
    # minimise the second (e.g. FDR): now the low-y points win
    assert pareto_front(points, [True, False]) == [0, 7]
    assert pareto_front([(0.5, 0.5)], [True, True]) == [0]
    assert pareto_front([(1.0, 0.1), (0.1, 1.0), (0.5, 0.5)], [True, True]) == [0, 1, 2]


def test_minimised_objective_front():
    pts = [(0.9, 0.3), (0.8, 0.1), (0.7, 0.05), (0.6, 0.2)]  # (F1 up, FDR down)
    assert pareto_front(pts, [True, False]) == [0, 1, 2]


def _config_run(name: str, lam: str, f1: tuple[float, ...], pg: tuple[float, ...]):
    """A configuration run as a repeated sweep logs it: the mean over seeds of each ``best_val_*``,
    with its 95 % interval (``_ci_low`` / ``_ci_high``) where given as (mean, low, high)."""
    from sweeps.tracking.lookup import RunRow

    metrics = {}
    for key, values in (("best_val_f1_macro", f1), ("best_val_pointing_game", pg)):
        metrics[key] = values[0]
        if len(values) == 3:
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = values[1:]
    params = {"attention.lambda": lam, "data.task": "ne", "model.backbone": "resnet18"}
    return RunRow(name, name, "demo", "demo", name, "FINISHED", params, metrics, {"cxr.repeats": "3"})


def test_the_front_chart_draws_each_configurations_interval_over_seeds(tmp_path, monkeypatch):
    from matplotlib.container import ErrorbarContainer

    from sweeps.results import front

    runs = [
        _config_run("ce", "1.0", (0.70, 0.66, 0.75), (0.40, 0.31, 0.47)),  # dominated by a and b
        _config_run("a", "0.5", (0.85, 0.80, 0.88), (0.50, 0.44, 0.58)),  # front
        _config_run("b", "adaptive", (0.75, 0.70, 0.79), (0.70, 0.61, 0.77)),  # front
        _config_run("c", "0.25", (0.60, 0.52, 0.66), (0.55, 0.50, 0.62)),  # dominated by b
        _config_run("d", "0.75", (0.65,), (0.45,)),  # no interval (e.g. one seed): a point, no bars
    ]
    drawn = []
    save = front.save_png
    monkeypatch.setattr(front, "save_png", lambda fig, path: drawn.append(fig) or save(fig, path))
    png = front.front_chart(runs, ["val_f1_macro", "val_pointing_game"], tmp_path / "pareto.png")
    assert png == tmp_path / "pareto.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))
    (ax,) = drawn[0].axes
    assert ax.get_title() == "2 of 5 configurations on the front; bars: 95 % interval over seeds"
    points = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(points) == len(runs)
    for run, point in zip(runs, points, strict=True):  # drawn in the order given
        data, _, bars = point.lines
        x, y = run.metrics["best_val_f1_macro"], run.metrics["best_val_pointing_game"]
        assert (data.get_xdata()[0], data.get_ydata()[0]) == pytest.approx((x, y))
        if run.run_id == "d":
            assert not point.has_xerr and not point.has_yerr and bars == ()
            continue
        assert point.has_xerr and point.has_yerr
        spans = {}
        for collection in bars:
            ((x0, y0), (x1, y1)) = collection.get_segments()[0]
            spans["x" if y0 == y1 else "y"] = sorted((x0, x1)) if y0 == y1 else sorted((y0, y1))
        for axis, key in (("x", "best_val_f1_macro"), ("y", "best_val_pointing_game")):
            want = [run.metrics[f"{key}_ci_low"], run.metrics[f"{key}_ci_high"]]
            assert spans[axis] == pytest.approx(want), (run.run_id, axis)
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
    assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == [(0.75, 0.70), (0.85, 0.50)]
    assert any(t.get_text() == "CE (λ = 1)" for t in ax.texts)

    drawn.clear()  # a single-seed sweep: no interval to draw, and the title does not promise one
    single = [
        _config_run(
            r.run_id,
            r.params["attention.lambda"],
            (r.metrics["best_val_f1_macro"],),
            (r.metrics["best_val_pointing_game"],),
        )
        for r in runs
    ]
    front.front_chart(single, ["val_f1_macro", "val_pointing_game"], tmp_path / "single.png")
    (ax,) = drawn[0].axes
    assert "bars" not in ax.get_title()
    assert not any(c.has_xerr or c.has_yerr for c in ax.containers if isinstance(c, ErrorbarContainer))


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (
            ["metric=[val_f1_macro,val_pointing_game]"],
            r"ASHA stops trials on one metric, and this sweep has 2",
        ),
        (
            ["metric=[val_f1_macro,val_pointing_game]", "scheduler.type=fifo", "mode=max"],
            r"a list of directions",
        ),
        (
            ["metric=[val_f1_macro,val_pointing_game]", "scheduler.type=fifo", "mode=[max]"],
            r"1 directions for 2",
        ),
        (["metric=[val_f1_macro,val_f1_macro]", "scheduler.type=fifo"], r"names a metric twice"),
        (["metric=[val_f1_macro,test_auc]", "scheduler.type=fifo"], r"never select on test"),
        (
            ["metric=[val_f1_macro,val_fdr]", "scheduler.type=fifo", "mode=[max,max]"],
            r"'max' contradicts metric 'val_fdr'",
        ),
    ],
)
def test_bad_objectives_name_the_field(sets, expected):
    with pytest.raises(ConfigError, match=expected):
        load_sweep(DEMO, overrides=sets)


def test_a_list_of_metrics_makes_objectives_the_first_is_the_metric():
    spec, base = load_sweep(DEMO, overrides=["metric=[val_f1_macro,val_fdr]", "scheduler.metric=first"])
    assert (spec.metric, spec.mode) == ("val_f1_macro", "max")
    assert spec.all_metrics == ["val_f1_macro", "val_fdr"] and spec.all_modes == ["max", "min"]
    assert base.train.selection_metric == "val_f1_macro"
    single, _ = load_sweep(DEMO, overrides=["metric=[val_auc]"])
    assert single.objectives == [] and single.all_metrics == ["val_auc"]
    again = type(spec).model_validate(spec.model_dump())  # a saved spec reloads as it ran
    assert again.all_metrics == spec.all_metrics and again.all_modes == spec.all_modes


@pytest.mark.slow
def test_a_two_objective_sweep_through_the_cli(local_ray, nep_cache, tmp_path):
    from ray.tune.search.optuna import OptunaSearch
    from typer.testing import CliRunner

    from sweeps.cli import app
    from tests.conftest import sweep_overrides, sweep_runs

    runner = CliRunner()
    sets = sweep_overrides(
        nep_cache,
        tmp_path,
        **{
            "trial.model.backbone": "test_resnet",
            "trial.train.epochs": "1",
            "trial.data.task": "nep",
            "num_samples": "4",
            "metric": "[val_f1_macro,val_pointing_game]",
            "scheduler.type": "fifo",
            "search.sampler": "nsga2",
        },
    )
    args = ["sweep", "run", str(DEMO)]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    client, parents, runs = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    assert parents[0].data.params["objectives"] == "val_f1_macro,val_pointing_game"
    # the searcher received both objectives of every trial, as the runs logged them
    search = OptunaSearch()
    search.restore_from_dir(str(tmp_path / "demo"))
    study = search._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert type(study.sampler).__name__ == "NSGAIISampler"
    told = sorted(tuple(t.values) for t in study.trials)
    logged = sorted(
        (r.data.metrics["best_val_f1_macro"], r.data.metrics["best_val_pointing_game"]) for r in runs
    )
    assert told == logged

    out = runner.invoke(app, ["best", "demo", "--storage", str(tmp_path), "--pareto", "--json"])
    assert out.exit_code == 0, out.output
    listed = {r["run_id"] for r in json.loads(out.output)}
    points = [(r.data.metrics["best_val_f1_macro"], r.data.metrics["best_val_pointing_game"]) for r in runs]
    expected = {runs[i].info.run_id for i in pareto_front(points, [True, True])}
    assert listed == expected and listed

    reported = runner.invoke(app, ["report", "demo", "--storage", str(tmp_path)])
    assert reported.exit_code == 0, reported.output
    png = tmp_path / "demo" / "report" / "pareto.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    logged_files = [a.path for a in client.list_artifacts(parents[0].info.run_id, "report")]
    assert "report/pareto.png" in logged_files
