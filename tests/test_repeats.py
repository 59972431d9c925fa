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
    assert min(runs) < max(runs) or min(runs) < 5, runs  # at least one seed stopped early
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
