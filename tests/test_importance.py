"""fANOVA importance of the searched settings, replayed through the sweep's own Optuna space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sweeps.results.importance import MIN_TRIALS, param_importance, param_label
from sweeps.space import load_sweep
from sweeps.tracking.lookup import RunRow
from sweeps.tracking.runs import SEARCH_CONFIG_TAG

ROOT = Path(__file__).resolve().parents[1]


def _run(i: int, config: dict, score: float) -> RunRow:
    return RunRow(
        run_id=f"{i:032x}",
        run_name=f"r{i}",
        experiment="demo",
        sweep="demo",
        trial_id=f"t{i:03d}",
        status="FINISHED",
        params={},
        metrics={"best_val_f1_macro": score},
        tags={SEARCH_CONFIG_TAG: json.dumps(config)},
    )


def _demo_runs(n: int, score_of, seed: int = 0) -> list[RunRow]:
    """Runs of the demo space (λ fixed or adaptive, t, lr) whose score is ``score_of(config)``."""
    rng = np.random.default_rng(seed)
    runs = []
    for i in range(n):
        if rng.random() < 0.5:
            lam = {"kind": "fixed", "value": float(rng.uniform(0.25, 1.0))}
        else:
            lam = {"kind": "adaptive", "adaptive": {"slope": float(rng.uniform(0.05, 0.2)), "floor": 0.2}}
        config = {
            "attention.lambda": lam,
            "attention.threshold": float(rng.uniform(0.3, 0.7)),
            "train.lr": float(np.exp(rng.uniform(np.log(3e-4), np.log(3e-3)))),
        }
        runs.append(_run(i, config, score_of(config)))
    return runs


@pytest.fixture(scope="module")
def demo_params():
    spec, _ = load_sweep(ROOT / "search_spaces" / "demo.yaml")
    return dict(spec.params)


def _lr_only(config: dict) -> float:
    return 0.5 + 0.2 * np.log10(config["train.lr"] / 3e-4)  # the score is the learning rate's alone


@pytest.mark.parametrize("with_space", [True, False], ids=["sweep space", "inferred"])
def test_the_setting_the_score_depends_on_comes_first(demo_params, with_space):
    imp = param_importance(_demo_runs(30, _lr_only), "val_f1_macro", demo_params if with_space else None)
    assert imp.n_trials == 30 and imp.metric == "best_val_f1_macro"
    assert next(iter(imp.values)) == "train.lr" and imp.values["train.lr"] > 0.8, imp.values
    assert sum(imp.values.values()) == pytest.approx(1.0)
    # the λ value and the schedule's slope exist in some trials only: Optuna's rule leaves them out
    assert set(imp.values) == {"train.lr", "attention.threshold", "attention.lambda/kind"}
    assert "attention.lambda/value" in imp.left_out and "attention.lambda/adaptive/slope" in imp.left_out


def test_a_schedule_choice_that_matters_is_found(demo_params):
    def by_branch(config):
        return 0.9 if config["attention.lambda"]["kind"] == "adaptive" else 0.6

    imp = param_importance(_demo_runs(30, by_branch, seed=1), "val_f1_macro", demo_params)
    assert next(iter(imp.values)) == "attention.lambda/kind" and imp.values["attention.lambda/kind"] > 0.8
    assert param_label("attention.lambda/kind") == "attention.lambda (fixed or schedule)"


def test_too_few_trials_or_draws_outside_the_space_say_why(demo_params):
    few = param_importance(_demo_runs(MIN_TRIALS - 1, _lr_only), "val_f1_macro", demo_params)
    assert not few.values and f"fANOVA needs {MIN_TRIALS}" in few.note
    runs = _demo_runs(MIN_TRIALS + 2, _lr_only)
    for r in runs[:3]:  # drawn by another space: t outside this sweep's [0.3, 0.7]
        config = json.loads(r.tags[SEARCH_CONFIG_TAG])
        r.tags[SEARCH_CONFIG_TAG] = json.dumps({**config, "attention.threshold": 0.95})
    outside = param_importance(runs, "val_f1_macro", demo_params)
    assert outside.n_trials == MIN_TRIALS - 1 and "lie in the sweep's space" in outside.note
    same = param_importance(_demo_runs(MIN_TRIALS, lambda c: 0.5), "val_f1_macro", demo_params)
    assert "no variance" in same.note
    untagged = [_run(i, {}, 0.5) for i in range(MIN_TRIALS)]
    for r in untagged:
        del r.tags[SEARCH_CONFIG_TAG]
    assert "logged before this version" in param_importance(untagged, "val_f1_macro").note
