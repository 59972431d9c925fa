"""search.warm_start: an earlier sweep's finished configurations seed this sweep's Optuna study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps.driver.warm import warm_start, warm_storage
from sweeps.space import load_sweep
from sweeps.tracking.lookup import SelectionError
from sweeps.tracking.runs import SEARCH_CONFIG_TAG
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


def _pilot(storage: Path, name: str = "pilot") -> tuple[str, list[float]]:
    """A finished sweep ``name`` written straight into ``storage/mlflow.db``: 5 configurations of the
    demo space, one drawn outside it (t = 0.95), one logged before draws were stored."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking.runs import experiment_id, log_metrics

    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, name, uri)
    parent = client.create_run(exp, run_name=name, tags={"cxr.kind": "sweep"})
    draws = [
        ({"kind": "fixed", "value": 1.0}, 0.5, 1e-3, 0.71),
        ({"kind": "fixed", "value": 0.5}, 0.4, 2e-3, 0.78),
        ({"kind": "adaptive", "adaptive": {"slope": 0.1, "floor": 0.2}}, 0.6, 5e-4, 0.74),
        ({"kind": "fixed", "value": 0.3}, 0.95, 1e-3, 0.99),  # outside this space: t in [0.3, 0.7]
        ({"kind": "fixed", "value": 0.6}, 0.5, 1e-3, 0.66),  # untagged (an older run)
    ]
    kept = []
    for i, (lam, t, lr, score) in enumerate(draws):
        config = {"attention.lambda": lam, "attention.threshold": t, "train.lr": lr}
        tags = {"mlflow.parentRunId": parent.info.run_id, "cxr.kind": "trial", "ray.trial_id": f"p{i}"}
        if i != 4:
            tags[SEARCH_CONFIG_TAG] = json.dumps(config)
        run = client.create_run(exp, run_name=f"p{i}", tags=tags)
        log_metrics(client, run.info.run_id, {"best_val_f1_macro": score, "test_f1_macro": score})
        client.set_terminated(run.info.run_id, "FINISHED")
        if i < 3:
            kept.append(score)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri, kept


def test_the_pilots_configurations_become_completed_trials(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.space import optuna_space

    uri, scores = _pilot(tmp_path)
    spec, _ = load_sweep(DEMO, overrides=["search.warm_start=pilot", f"storage_path={tmp_path}"])
    warm = warm_start(spec, uri)
    assert sorted(v for _, _, (v,) in warm.trials) == sorted(scores)
    assert (warm.skipped, warm.untagged) == (1, 1)
    assert "3 finished configurations of sweep 'pilot'" in warm.describe()
    assert "1 outside this sweep's space skipped" in warm.describe()
    # the study OptunaSearch opens holds them, complete, before its first suggestion
    search = OptunaSearch(
        space=optuna_space(spec),
        metric="val_f1_macro",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3),
        storage=warm_storage(spec, warm),
    )
    trials = search._ot_study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert sorted(t.value for t in trials) == sorted(scores)
    best = max(trials, key=lambda t: t.value)
    assert best.params == {
        "attention.lambda/kind": "fixed",
        "attention.lambda/value": 0.5,
        "attention.threshold": 0.4,
        "train.lr": 2e-3,
    }
    config = search.suggest("new")  # past TPE's start-up already: the model proposes
    assert "train.lr" in config and len(search._ot_study.trials) == 4


def test_bad_warm_starts_name_the_problem(tmp_path):
    uri, _ = _pilot(tmp_path)
    with pytest.raises(ConfigError, match="search.warm_start: random search draws without a model"):
        load_sweep(DEMO, overrides=["search.warm_start=pilot", "search.algorithm=random"])
    spec, _ = load_sweep(DEMO, overrides=["search.warm_start=nosuch"])
    with pytest.raises(SelectionError, match="search.warm_start 'nosuch': unknown sweep 'nosuch'"):
        warm_start(spec, uri)
    spec, _ = load_sweep(DEMO, overrides=["search.warm_start=pilot", "metric=val_auc"])
    with pytest.raises(SelectionError, match="none of its 5 finished runs logged best_val_auc"):
        warm_start(spec, uri)
    narrow = ["search.warm_start=pilot", "params.train.lr.low=0.005", "params.train.lr.high=0.01"]
    spec, _ = load_sweep(DEMO, overrides=narrow)
    with pytest.raises(SelectionError, match="no finished configuration of it lies in this sweep's space"):
        warm_start(spec, uri)
    assert warm_start(load_sweep(DEMO)[0], uri) is None
