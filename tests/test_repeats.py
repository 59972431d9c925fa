"""Seed repeats in the trainer: k seeds in lockstep give what each gives alone; their summary."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from scipy import stats

from tests.conftest import tiny_config
from trainer.config import TrialConfig
from trainer.loop import run_trial
from trainer.repeats import mean_report, run_repeats, seed_configs, seed_summary, summarize

_KEYS = ("best_val_", "test_")


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith(_KEYS)}


def test_lockstep_seeds_equal_each_seed_alone(ne_cache, tmp_path):
    base = TrialConfig.from_dict(tiny_config(ne_cache, tmp_path / "rep", train={"epochs": 3, "seed": 4}))
    cfgs = seed_configs(base, 3)
    assert [c.train.seed for c in cfgs] == [4, 5, 6]
    assert [c.output_dir.name for c in cfgs] == ["seed_0", "seed_1", "seed_2"]
    rounds = []
    results = run_repeats(cfgs, report=lambda reports, epoch, dirs: rounds.append((reports, epoch, dirs)))
    assert [e for _, e, _ in rounds] == [0, 1, 2]
    assert all(len(r) == 3 and len(d) == 3 for r, _, d in rounds)
    alone = [
        run_trial(tiny_config(ne_cache, tmp_path / f"alone{s}", train={"epochs": 3, "seed": s}))
        for s in (4, 5, 6)
    ]
    assert [_summary(r) for r in results] == [_summary(a) for a in alone]
    # the seeds differ (else a repeat says nothing)
    assert len({r["best_val_loss"] for r in results}) == 3
    # each round's reports are that epoch's, one per seed
    last = rounds[-1][0]
    assert [m["best_val_f1_macro"] for m in last] == [r["best_val_f1_macro"] for r in results]


def test_a_stopped_seed_keeps_its_last_report_in_the_mean(ne_cache, tmp_path):
    # patience 1 with the plateau early stop: some seed stops before the last epoch
    base = TrialConfig.from_dict(
        tiny_config(ne_cache, tmp_path / "rep", train={"epochs": 5, "early_stop_patience": 1, "lr": 3e-2})
    )
    rounds = []
    results = run_repeats(seed_configs(base, 3), report=lambda r, e, d: rounds.append((r, e)))
    runs = [r["epochs_run"] for r in results]
    assert min(runs) < 5, runs  # at least one seed stopped early
    assert len(rounds) == max(runs)
    for reports, epoch in rounds:
        for i, m in enumerate(reports):
            assert m["epoch"] == min(epoch, runs[i] - 1)  # a stopped seed: its last epoch


def test_resumed_repeats_continue_every_seed(ne_cache, tmp_path):
    base = TrialConfig.from_dict(tiny_config(ne_cache, tmp_path / "full", train={"epochs": 3}))
    full = run_repeats(seed_configs(base, 2))

    class Killed(Exception):
        pass

    saved = tmp_path / "saved"

    def kill_after_epoch_1(reports, epoch, dirs):
        if epoch == 1:
            for i, d in enumerate(dirs):
                shutil.copytree(d, saved / f"seed_{i}")
            raise Killed

    cfgs = seed_configs(TrialConfig.from_dict(tiny_config(ne_cache, tmp_path / "k", train={"epochs": 3})), 2)
    with pytest.raises(Killed):
        run_repeats(cfgs, report=kill_after_epoch_1)
    seen = []
    resumed = run_repeats(
        cfgs,
        report=lambda r, e, d: seen.append((e, [m["epoch"] for m in r])),
        resume_from=[saved / "seed_0", saved / "seed_1"],
    )
    assert seen == [(2, [2.0, 2.0])]
    assert [_summary(r) for r in resumed] == [_summary(r) for r in full]


def test_mean_report_and_seed_summary():
    reports = [{"val_f1_macro": 0.5, "epoch": 1, "x": 1.0}, {"val_f1_macro": 0.7, "epoch": 1}]
    assert mean_report(reports) == {"val_f1_macro": pytest.approx(0.6), "epoch": 1.0}
    assert mean_report([{"val_auc": math.nan}, {"val_auc": 0.8}]) == {"val_auc": 0.8}

    values = [0.61, 0.70, 0.64]
    s = summarize(values)
    t = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(t)
    assert math.isnan(summarize([0.5])["std"])

    results = [
        {"test_f1_macro": v, "best_val_f1_macro": v + 0.1, "best_epoch": 2, "name": "a"} for v in values
    ]
    out = seed_summary(results)
    assert out["test_f1_macro"] == pytest.approx(np.mean(values))
    assert out["best_val_f1_macro_std"] == pytest.approx(np.std(values, ddof=1))
    assert (out["test_f1_macro_ci_low"], out["test_f1_macro_ci_high"]) == pytest.approx(t)
    assert out["best_epoch"] == 2.0 and "best_epoch_std" not in out and "name" not in out


def test_an_interval_stays_in_the_metric_range():
    out = seed_summary([{"test_auc": 0.55, "test_loss": 0.5}, {"test_auc": 0.95, "test_loss": 2.5}])
    assert out["test_auc_ci_low"] == 0.0 and out["test_auc_ci_high"] == 1.0  # t(1) = 12.7: wider than [0, 1]
    assert out["test_loss_ci_low"] < 0  # a loss has no upper or lower bound to cut at


# ---- the whole path through the CLI: a sweep with repeats and a CE baseline, compare, report --ci ----
def _metric_steps(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_a_repeated_sweep_through_the_cli(local_ray, ne_cache, tmp_path):
    import json
    from pathlib import Path

    from ray.tune.search.optuna import OptunaSearch
    from typer.testing import CliRunner

    from sweeps.cli import app
    from tests.conftest import sweep_overrides, sweep_runs

    runner = CliRunner()
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
    sets = sweep_overrides(
        ne_cache, tmp_path, **{"trial.model.backbone": "test_resnet", "trial.train.epochs": "2"}
    )
    args = ["sweep", "run", str(space), "--set", "num_samples=3", "--set", "repeats=3"]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    client, parents, configs = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    assert len(configs) == 3  # one run per configuration, not per seed
    exp = configs[0].info.experiment_id

    # the searcher received exactly one value per configuration: the mean over its seeds
    search = OptunaSearch()
    search.restore_from_dir(str(tmp_path / "demo"))
    values = sorted(t.values[0] for t in search._ot_study.trials if t.values)
    assert len(search._ot_study.trials) == 3 and len(values) == 3
    means = []
    for config in configs:
        seeds = client.search_runs([exp], f"tags.mlflow.parentRunId = '{config.info.run_id}'")
        seeds = sorted(seeds, key=lambda r: int(r.data.tags["cxr.seed_index"]))
        assert [r.data.params["train.seed"] for r in seeds] == ["0", "1", "2"]
        assert all(r.info.status == "FINISHED" and r.data.tags["cxr.kind"] == "seed" for r in seeds)
        m = config.data.metrics
        for key in ("best_val_f1_macro", "test_f1_macro", "test_auc"):
            per_seed = [r.data.metrics[key] for r in seeds]
            assert m[key] == pytest.approx(np.mean(per_seed), abs=1e-12)
            assert m[f"{key}_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
        means.append(m["best_val_f1_macro"])
        # what ASHA saw at each epoch: the mean of the seeds' validation F1 at that epoch
        seen = _metric_steps(client, config.info.run_id, "val_f1_macro")
        per_epoch = [_metric_steps(client, r.info.run_id, "val_f1_macro") for r in seeds]
        assert sorted(seen) == [0, 1]
        for step, v in seen.items():
            assert v == pytest.approx(np.mean([p[step] for p in per_epoch]), abs=1e-12)
        assert config.data.tags["cxr.best_seed_run"] in {r.info.run_id for r in seeds}
    assert values == pytest.approx(sorted(means), abs=1e-12)

    storage = ["--storage", str(tmp_path)]
    best = runner.invoke(app, ["best", "demo", *storage], env={"COLUMNS": "200"})
    assert best.exit_code == 0 and "trained with 3 seeds" in best.output, best.output

    compared = runner.invoke(app, ["compare", "demo", *storage, "--candidates", "all", "--min-images", "10"])
    assert compared.exit_code == 0, compared.output
    assert "across 3 seeds" in compared.output
    comps = json.loads((tmp_path / "demo" / "compare" / "compare.json").read_text())["comparisons"]
    assert len(comps) == 2 and all(c["seeds"]["f1_macro"]["n_seeds"] == 3 for c in comps)
    assert all(len(c["seed_pairs"]) == 3 for c in comps)

    reported = runner.invoke(app, ["report", "demo", *storage, "--ci", "--resamples", "500"])
    assert reported.exit_code == 0, reported.output
    md = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "Brackets: a 95 % interval" in md and " / " in md
    import csv

    with open(tmp_path / "demo" / "report" / "detail.csv") as f:
        rows = list(csv.DictReader(f))
    f1 = [r for r in rows if r["metric"] == "f1_macro"]
    assert f1 and all(float(r["low"]) <= float(r["value"]) <= float(r["high"]) for r in f1)

    out = tmp_path / "export"
    exported = runner.invoke(app, ["export", "demo", *storage, "--out", str(out), "--no-register"])
    assert exported.exit_code == 0, exported.output
    card = (out / "model_card.md").read_text()
    # the model of the best seed (on validation) of a configuration ranked first on the mean
    seed_run = client.get_run(json.loads((out / "export.json").read_text())["run_id"])
    config = client.get_run(seed_run.data.tags["mlflow.parentRunId"])
    assert config.data.metrics["best_val_f1_macro"] == max(means)
    assert config.data.tags["cxr.best_seed_run"] == seed_run.info.run_id
    siblings = client.search_runs([exp], f"tags.mlflow.parentRunId = '{config.info.run_id}'")
    assert seed_run.data.metrics["best_val_f1_macro"] == max(
        r.data.metrics["best_val_f1_macro"] for r in siblings
    )
    assert f"This model is seed {seed_run.data.params['train.seed']}'s" in card
