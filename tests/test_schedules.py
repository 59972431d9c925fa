"""λ schedules: the registry reaches the trial config and the search spaces (the cosine schedule,
added in trainer/schedules.py alone, is the proof)."""

from pathlib import Path

import pytest
import yaml

from sweeps.space import load_sweep, ray_param_space, trial_config_for
from trainer import run_trial
from trainer.config import ConfigError, TrialConfig
from trainer.schedules import SCHEDULES, create_schedule, schedule_names, schedule_parameters

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**attention):
    return TrialConfig.from_dict({"data": {"cache": "/tmp/nowhere", "task": "ne"}, "attention": attention})


def test_cosine_falls_from_one_to_its_floor_over_its_period():
    lam = create_schedule("cosine", floor=0.2, period=10)
    assert [lam(e) for e in (0, 5, 10, 20)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert all(lam(e) >= lam(e + 1) for e in range(12))  # never rises
    assert schedule_parameters("cosine")["period"].kind is int


@pytest.mark.parametrize("name", schedule_names())
def test_every_schedule_starts_at_plain_ce_and_stays_in_the_unit_interval(name):
    lam = create_schedule(name)
    assert lam(0) == pytest.approx(1.0)
    assert all(0.0 <= lam(e) <= 1.0 for e in range(200))


def test_a_schedule_is_chosen_by_name_in_the_trial_config():
    att = _cfg(**{"lambda": "cosine", "schedule": {"floor": 0.1, "period": 4}}).attention
    assert att.schedule == {"floor": 0.1, "period": 4}
    assert [att.lambda_at(e) for e in (0, 2, 4)] == pytest.approx([1.0, 0.55, 0.1])
    assert _cfg(**{"lambda": "cosine"}).attention.schedule == {"floor": 0.2, "period": 50}  # defaults
    assert "cosine" in SCHEDULES


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"period": 0}, "period must be >= 1"),
        ({"period": 2.5}, "period must be a whole number"),
        ({"floor": 1.5}, "floor must be in \\[0, 1\\]"),
        ({"slope": 0.1}, "the 'cosine' schedule has no parameter slope \\(it takes floor, period\\)"),
    ],
)
def test_bad_schedule_parameters_name_the_field(schedule, message):
    with pytest.raises(ConfigError, match=f"attention.schedule: {message}"):
        _cfg(**{"lambda": "cosine", "schedule": schedule})


def _space(tmp_path, lam: dict) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces/demo.yaml").read_text())
    raw["params"]["attention.lambda"] = lam
    raw["search"].pop("points_to_evaluate", None)  # the demo's λ = 1 point: not in every λ space
    raw["trial"]["data"]["cache"] = str(ROOT / "demo-output/cache/ne")
    raw["storage_path"] = str(tmp_path / "sweeps")
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_cosine_is_searchable_with_optuna_and_random_search(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.space import optuna_space

    branch = {"floor": {"low": 0.1, "high": 0.3}, "period": {"low": 5, "high": 20}}
    spec, _ = load_sweep(
        _space(tmp_path, {"type": "lambda", "fixed": None, "adaptive": None, "cosine": branch})
    )
    search = OptunaSearch(space=optuna_space(spec), metric="val_f1_macro", mode="max")
    draws = [search.suggest(str(i))["attention.lambda"] for i in range(8)]
    draws.append(ray_param_space(spec)["attention.lambda"].func(None))  # random search's draw
    for draw in draws:
        att = trial_config_for(spec, {"attention.lambda": draw}, "t", str(tmp_path / "t")).attention
        assert att.lambda_ == "cosine"
        assert 0.1 <= att.schedule["floor"] <= 0.3 and 5 <= att.schedule["period"] <= 20
        assert isinstance(att.schedule["period"], int)


def test_a_searched_cosine_range_is_checked_before_any_trial(tmp_path):
    bad = {"type": "lambda", "cosine": {"period": {"low": 0, "high": 10}}}
    with pytest.raises(ConfigError, match="(?s)params.attention.lambda .*period must be >= 1"):
        load_sweep(_space(tmp_path, bad))
    with pytest.raises(ConfigError, match="cosine: no parameter slope"):
        load_sweep(_space(tmp_path, {"type": "lambda", "cosine": {"slope": 0.1}}))


def test_a_trial_trains_on_the_cosine_schedule(ne_cache, tmp_path):
    lambdas = []
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"cache": str(ne_cache), "task": "ne"},
        "model": {"backbone": "test_resnet"},
        "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3},
        "attention": {"lambda": "cosine", "schedule": {"floor": 0.4, "period": 2}, "mode": "soft"},
    }
    run_trial(cfg, report=lambda m, e, d: lambdas.append(m["lambda"]))
    assert lambdas == pytest.approx([1.0, 0.7, 0.4])
