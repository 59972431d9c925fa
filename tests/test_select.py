"""`cxr-sweep best`: validation-only selection over a sweep's finished runs (crafted MLflow store)."""

import json
import random

import pytest
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.cli.results import best_table
from sweeps.results.select import metric_key, rank_runs
from sweeps.tracking.lookup import SelectionError, find_runs

from . import _results_fixtures as fx
from ._results_fixtures import copy_crafted

crafted = fx.crafted  # the fixture

runner = CliRunner()


def _best(c, *args):
    return runner.invoke(app, ["best", c.experiment, "--tracking-uri", c.uri, *args], env={"COLUMNS": "250"})


def _ids(c, labels):
    return [c.runs[label] for label in labels]


def test_best_selects_on_validation_even_when_another_run_is_best_on_test(crafted):
    result = _best(crafted, "--json", "--top", "10")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    finished = ["vgg_one", "vgg_half", "r50_half", "r50_adapt", "vgg_adapt", "r50_half_b", "r50_one"]
    assert [r["run_id"] for r in rows] == _ids(crafted, finished)
    best_on_test = max(rows, key=lambda r: r["metrics"]["test_f1_macro"])
    assert best_on_test["run_id"] == crafted.runs["r50_half_b"] != rows[0]["run_id"]
    assert rows[0]["selection_metric"] == "best_val_f1_macro" and rows[0]["rank"] == 1
    assert rows[0]["metrics"] == crafted.metrics["vgg_one"]  # exactly what was logged
    assert rows[0]["searched"] == {"attention.lambda": 1.0, "attention.threshold": 0.5}  # numbers


def test_ties_break_by_trial_id_whatever_the_order_runs_come_in(crafted):
    runs = find_runs([crafted.experiment], tracking_uri=crafted.uri).runs
    expected = [r.run_id for r in rank_runs(runs, "f1_macro")]
    for seed in range(5):
        random.Random(seed).shuffle(runs)
        assert [r.run_id for r in rank_runs(runs, "val_f1_macro")] == expected
    assert expected[:2] == _ids(crafted, ["vgg_one", "vgg_half"])  # equal best_val_f1_macro 0.83


def test_lower_is_better_metrics_rank_ascending(crafted):
    runs = find_runs([crafted.experiment], tracking_uri=crafted.uri).runs
    ranked = rank_runs(runs, "best_val_fdr")
    values = [r.metrics["best_val_fdr"] for r in ranked]
    assert values == sorted(values)
    assert metric_key("f1_macro") == metric_key("val_f1_macro") == metric_key("best_val_f1_macro")


def test_stopped_failed_and_older_runs_are_left_out_unless_asked(crafted):
    ids = {r["run_id"] for r in json.loads(_best(crafted, "--json", "--top", "50").output)}
    assert not ids & set(_ids(crafted, ["stopped", "failed", "old"]))
    with_stopped = json.loads(_best(crafted, "--json", "--include-stopped").output)
    assert with_stopped[0]["run_id"] == crafted.runs["stopped"]  # 0.97 on validation, no test metrics
    whole_experiment = runner.invoke(
        app, ["best", "--experiment", crafted.experiment, "--tracking-uri", crafted.uri, "--json"]
    )
    assert json.loads(whole_experiment.output)[0]["run_id"] == crafted.runs["old"]  # every trial run


def test_filter_narrows_the_runs(crafted):
    result = _best(crafted, "--json", "--filter", "params.`model.backbone` = 'resnet50'")
    rows = json.loads(result.output)
    assert {r["params"]["model.backbone"] for r in rows} == {"resnet50"}
    assert rows[0]["run_id"] == crafted.runs["r50_half"]


def test_table_shows_test_metrics_with_localization_next_to_f1(crafted):
    result = _best(crafted, "--top", "2")  # piped: plain columns, a header line and one line a row
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "by best_val_f1_macro (validation)" in lines[0]
    header = next(line for line in lines if "val F1" in line and line.startswith("#"))
    for col in (" F1", "pointing", "CAM in", "YI", "DP", "sens", "spec", "params", "run"):
        assert col in header, col
    assert header.index(" F1 ") < header.index("pointing") < header.index("CAM in") < header.index("acc")
    assert header.index("val F1") < header.index(" F1 ") < header.index("params")
    assert f"{crafted.metrics['vgg_one']['test_youden_index']:.3f}" in result.output
    assert len(lines) == 2 + 2 + 1  # title, header, 2 rows, caption: nothing wrapped or cut
    found = find_runs([crafted.experiment], tracking_uri=crafted.uri)
    for r in found.runs:  # as if no run had lesion masks
        r.metrics = {k: v for k, v in r.metrics.items() if not k.endswith(("pointing_game", "cam_in_region"))}
    _, columns, _, _ = best_table(rank_runs(found.runs, "f1_macro"), "best_val_f1_macro", found)
    names = [c.name for c in columns]
    assert "pointing" not in names and "CAM in" not in names and "YI" in names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown sweep 'nope': no MLflow experiment of that name"),
        (
            ["crafted", "--metric", "val_nope"],
            "best_val_nope was never logged by these runs; logged: best_val_a",
        ),
        (["crafted", "--metric", "test_f1_macro"], "selection uses validation metrics only"),
        (["crafted", "--filter", "params.x ==="], "--filter"),
    ],
)
def test_bad_input_is_a_clear_error(crafted, args, message):
    result = runner.invoke(app, ["best", *args, "--tracking-uri", crafted.uri], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    if "nope" in args:
        assert "experiments: Default, crafted" in result.output


def test_a_sweep_without_finished_runs_says_what_it_has(crafted, tmp_path):
    from mlflow.tracking import MlflowClient

    c = copy_crafted(crafted, tmp_path)
    client = MlflowClient(c.uri)
    for label in ("r50_one", "r50_half", "r50_half_b", "r50_adapt", "vgg_one", "vgg_half", "vgg_adapt"):
        client.set_terminated(c.runs[label], "KILLED")
    with pytest.raises(
        SelectionError,
        match=r"no finished trial runs \(9 runs: 1 FAILED, 7 KILLED, 1 stopped early by ASHA\)",
    ):
        find_runs([c.experiment], tracking_uri=c.uri)
    result = runner.invoke(
        app, ["report", c.experiment, "--tracking-uri", c.uri, "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "no finished trial runs" in result.output
    assert not (tmp_path / "r").exists()


def test_a_missing_store_is_not_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    result = runner.invoke(app, ["best", "x", "--tracking-uri", uri])
    assert result.exit_code == 2 and "no MLflow store at" in result.output
    assert not (tmp_path / "none.db").exists()


def test_a_misspelt_sweep_name_with_storage_gets_a_suggestion(tmp_path):
    from sweeps.space import SPEC_FILE

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / SPEC_FILE).write_text("{}")  # only its presence is read before the name matches
    result = runner.invoke(app, ["best", "dmeo", "--storage", str(tmp_path)])
    assert result.exit_code == 2
    assert "did you mean 'demo'?" in result.output and "pass --storage" not in result.output


def test_a_store_too_slow_to_answer_the_search_is_named_not_the_filter(crafted, monkeypatch):
    """A search that times out (seen at 1000 trials on a busy server) is the store's failure: the
    message names it, and blames no --filter when none was given."""
    import requests
    from mlflow.tracking import MlflowClient

    real = MlflowClient.search_runs

    def slow(self, experiment_ids, filter_string="", *args, **kwargs):
        if "parentRunId" in filter_string and "'RUNNING'" not in filter_string:  # the trial runs' search
            raise requests.ReadTimeout("Read timed out. (read timeout=10)")
        return real(self, experiment_ids, filter_string, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", slow)
    result = _best(crafted)
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "--filter" not in out
    assert f"searching its runs in {crafted.uri} failed: Read timed out" in out


@pytest.mark.parametrize("metric", ["val_f1_macro", "val_fdr"])  # higher, lower is better
def test_best_of_a_large_sweep_reads_only_its_best_runs_and_ranks_as_the_full_search(
    tmp_path, metric, monkeypatch
):
    """`best --top N` lets MLflow sort and reads pages best first (a sweep of 1000 trials: 0.2 s of
    search instead of 9 s): the same N runs, ties at the N-th value and all, as ranking every run;
    NaN, missing, stopped-early and failed runs are left out as there."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import lookup
    from trainer.metrics import higher_is_better

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("big")
    parent = client.create_run(exp, tags={"cxr.kind": "sweep", "cxr.sweep": "big"}).info.run_id
    client.log_param(parent, "metric", "val_f1_macro")
    rng = random.Random(0)
    key = metric_key(metric)
    for i in range(160):  # several pages of 50: ties (values on a 0.05 grid), and the odd ones out
        value = float("nan") if i % 37 == 5 else round(rng.randint(0, 20) * 0.05, 2)
        tags = {"mlflow.parentRunId": parent, "cxr.kind": "trial", "ray.trial_id": f"t{i:04d}"}
        if i % 23 == 7:
            tags["cxr.stopped_early"] = "true"
        run = client.create_run(exp, run_name=f"trial-{i}", tags=tags).info.run_id
        metrics = {} if i % 41 == 9 else {key: value, "test_f1_macro": rng.random()}
        client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         tags=[RunTag("n", str(i))])  # fmt: skip
        client.set_terminated(run, "FAILED" if i % 31 == 3 else "FINISHED")
    client.set_terminated(parent, "FINISHED")
    full = rank_runs(find_runs(["big"], tracking_uri=uri).runs, metric)
    by = lambda _default: (key, higher_is_better(key))  # noqa: E731
    for n in (1, 5, 12, 30, 60):  # pages of max(4n, 50) runs: 60 reads them all in one
        top = lookup.find_top_runs("big", n, by, tracking_uri=uri)
        assert top.complete == (n == 60) and (n == 60 or len(top.runs) < 130)
        ranked = rank_runs(top.runs, metric)
        assert [r.run_id for r in ranked[:n]] == [r.run_id for r in full[:n]]
    monkeypatch.setattr(lookup, "TOP_PAGE", 1)  # small pages (max(4n, 1)) that end inside runs of ties
    for n in (1, 2, 3, 7):
        ranked = rank_runs(lookup.find_top_runs("big", n, by, tracking_uri=uri).runs, metric)
        assert [r.run_id for r in ranked[:n]] == [r.run_id for r in full[:n]]
    result = runner.invoke(app, ["best", "big", "--tracking-uri", uri, "--metric", metric, "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "top 3 finished runs by" in " ".join(result.output.split())  # no count: not every run was read
