"""Sweep files: validation before any trial starts, and the searcher spaces."""

from pathlib import Path

import optuna
import pytest
import yaml

from sweeps.driver.preflight import check_ray_address
from sweeps.space import load_sweep, optuna_space, ray_param_space, trial_config_for, trial_overrides
from sweeps.tracking.store import check_tracking
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))


def _write(tmp_path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces/demo.yaml").read_text())
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spaces_validate(path):
    spec, base = load_sweep(path)
    assert spec.params and base.data.cache.is_absolute()
    assert Path(spec.storage_path).is_absolute()


def test_paper_grid_is_the_papers_grid():
    spec, base = load_sweep(ROOT / "search_spaces/paper_grid.yaml")
    assert spec.total_trials == 15
    assert spec.params["attention.lambda"].values == [1.0, 0.75, 0.5, 0.25, "adaptive"]
    assert spec.params["model.backbone"].values == ["pvt_v2_b2_li", "vgg16", "resnet50"]
    assert base.attention.mode == "paper" and base.train.lr == 1e-5 and base.model.image_size == 224


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_sample": 3}, r"num_sample: unknown key"),
        ({"scheduler__grace": 3}, r"scheduler.grace: unknown key"),
        ({"num_samples": "many"}, r"num_samples: Input should be a valid integer"),
        ({"resources__gpu": 1.5}, r"resources.gpu: .*whole number"),
        ({"metric": "test_f1_macro"}, r"never select on test"),
        (
            {"params__attention.threshold": {"type": "uniform", "low": 0.5, "high": 1.2}},
            r"attention.threshold",
        ),
        ({"params__attention.lamda": {"type": "uniform", "low": 0.1, "high": 0.2}}, r"attention.lamda"),
        ({"params__train.lr": {"type": "gaussian", "mu": 1}}, r"params.train.lr"),
        (
            {"search__points_to_evaluate": [{"attention.lambda": 1.5}]},
            r"search.points_to_evaluate\[0\].attention.lambda: λ 1.5 is outside the searched \[0.25, 1.0\]",
        ),
        (
            {"search__points_to_evaluate": [{"attention.lambda": 1.0}, {"attention.mode": "soft"}]},
            r"search.points_to_evaluate\[1\].attention.mode: not a searched key \(params: attention.lambda,",
        ),
        ({"search__points_to_evaluate": [{"train.lr": 1.0}]}, r"\[0\].train.lr: 1.0 is outside \[0.0003"),
        ({"search__points_to_evaluate": [{"attention.lambda": "cosine"}]}, r"'cosine' is not a searched λ"),
        ({"num_samples": 1, "search__points_to_evaluate": [{}, {}]}, r"2 points but num_samples is 1"),
        ({"repeats": 0}, r"repeats: .*greater than or equal to 1"),
        (
            {"repeats": 3, "params__train.seed": {"type": "choice", "values": [0, 1]}},
            r"params.train.seed: with repeats: 3 every configuration trains seeds",
        ),
    ],
)
def test_bad_sweep_files_name_the_field(tmp_path, changes, expected):
    with pytest.raises(ConfigError, match=expected):
        load_sweep(_write(tmp_path, **changes))


def test_lambda_range_outside_unit_interval(tmp_path):
    bad = {"type": "uniform", "low": 0.5, "high": 1.5}
    with pytest.raises(
        ConfigError, match=r"(?s)params.attention.lambda \(with attention.lambda=1.5\).*\[0, 1\]"
    ):
        load_sweep(_write(tmp_path, **{"params__attention.lambda": bad}))
    bad = {"type": "lambda", "fixed": {"low": -0.2, "high": 0.5}}
    with pytest.raises(ConfigError, match=r"attention.lambda=-0.2"):  # (the demo's CE point left out)
        load_sweep(_write(tmp_path, **{"params__attention.lambda": bad, "search__points_to_evaluate": None}))


def test_grid_mixed_with_optuna_says_why_and_what_to_do(tmp_path):
    f = _write(
        tmp_path, **{"params__model.backbone": {"type": "grid", "values": ["resnet18", "test_resnet"]}}
    )
    with pytest.raises(ConfigError) as e:
        load_sweep(f)
    msg = str(e.value)
    assert "model.backbone" in msg and "search.algorithm: grid" in msg and "type: choice" in msg


def test_malformed_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\ntrial: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_sweep(f)
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "none.yaml")


def test_overrides_apply_before_validation(tmp_path):
    spec, base = load_sweep(ROOT / "search_spaces/demo.yaml", ["trial.train.epochs=1", "num_samples=3"])
    assert base.train.epochs == 1 and spec.num_samples == 3
    spec, _ = load_sweep(ROOT / "search_spaces/paper_grid.yaml", ["params.model.backbone.values=[resnet18]"])
    assert spec.params["model.backbone"].values == ["resnet18"] and spec.total_trials == 5
    with pytest.raises(ConfigError, match="no searched parameter 'model.depth'"):
        load_sweep(ROOT / "search_spaces/paper_grid.yaml", ["params.model.depth.values=[1]"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_sweep(ROOT / "search_spaces/paper_grid.yaml", ["params.model.backbone.values=[resnet5000]"])


def _optuna_suggestions(spec, n: int, seed: int):
    """Configs as Ray's OptunaSearch hands them to the trainable (random sampling, so both λ kinds)."""
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(
        space=optuna_space(spec),
        metric="val_f1_macro",
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed),
    )
    for i in range(n):
        yield search.suggest(str(i))
        search.on_trial_complete(str(i), {"val_f1_macro": 0.5})


def test_optuna_define_by_run_space_is_conditional():
    spec, _ = load_sweep(ROOT / "search_spaces/optuna_lambda.yaml")
    kinds = set()
    for config in _optuna_suggestions(spec, 30, seed=0):
        lam = config["attention.lambda"]  # one mapping per λ draw: the branch, then its parameters only
        kinds.add(lam["kind"])
        if lam["kind"] == "fixed":
            assert set(lam) == {"kind", "value"}  # no slope is modelled for a fixed-λ trial
        else:
            assert set(lam) == {"kind", "adaptive"} and set(lam["adaptive"]) == {"slope", "floor"}
        cfg = trial_config_for(spec, config, "t", "/tmp/t")  # every suggestion is a valid trial config
        assert (cfg.attention.lambda_ == "adaptive") == (lam["kind"] == "adaptive")
    assert kinds == {"fixed", "adaptive"}


def test_constant_adaptive_branch_reaches_the_trial():
    spec, _ = load_sweep(ROOT / "search_spaces/demo.yaml")  # floor is a constant 0.2 there
    for config in _optuna_suggestions(spec, 20, seed=3):
        if config["attention.lambda"]["kind"] == "adaptive":
            cfg = trial_config_for(spec, config, "t", "/tmp/t")
            assert cfg.attention.schedule["floor"] == 0.2 and 0.05 <= cfg.attention.schedule["slope"] <= 0.2
            return
    pytest.fail("no adaptive suggestion in 20 draws")


def test_lambda_draws_of_every_searcher_become_the_same_overrides():
    spec, _ = load_sweep(ROOT / "search_spaces/demo.yaml")
    adaptive = {"kind": "adaptive", "adaptive": {"slope": 0.1, "floor": 0.3}}
    assert trial_overrides(spec, {"attention.lambda": adaptive, "train.lr": 1e-3}) == {
        "attention.lambda": "adaptive",
        "attention.schedule": {"slope": 0.1, "floor": 0.3},
        "train.lr": 1e-3,
    }
    fixed = trial_overrides(spec, {"attention.lambda": {"kind": "fixed", "value": 0.4}})
    assert fixed == {"attention.lambda": 0.4, "attention.schedule": {}}
    draw = ray_param_space(spec)["attention.lambda"].func(None)  # random search: the same form
    assert draw["kind"] in ("fixed", "adaptive")
    assert trial_config_for(spec, {"attention.lambda": draw}, "t", "/tmp/t").attention.lambda_ in (
        draw.get("value"),
        "adaptive",
    )


def test_a_restored_trial_draws_the_same_lambda_again():
    """Ray re-resolves a function-valued parameter whenever it re-adds a trial (a resume does):
    λ comes from the trial's own stored seed, so the restored trial trains the λ it was logged with."""
    import copy

    from ray.tune.impl.placeholder import create_resolvers_map, inject_placeholders, resolve_placeholders
    from ray.tune.search.variant_generator import generate_variants

    spec, _ = load_sweep(ROOT / "search_spaces/demo.yaml")
    resolvers = create_resolvers_map()
    space = inject_placeholders(ray_param_space(spec), resolvers)  # as tune.run does
    draws = []
    for i in range(12):  # the variant generator draws the plain values; λ stays a placeholder
        [(_, unresolved)] = list(generate_variants(copy.deepcopy(space), random_state=i))
        again = []
        for _ in range(3):  # the first run, then two resumes
            config = copy.deepcopy(unresolved)
            resolve_placeholders(config, resolvers)
            again.append(config["attention.lambda"])
        assert again[0] == again[1] == again[2]
        draws.append(again[0])
    assert len({repr(d) for d in draws}) == len(draws) == 12  # and the trials still differ


def test_unreachable_tracking_server_and_ray_address_fail_fast():
    with pytest.raises(ConfigError, match="tracking server http://127.0.0.1:9 is unreachable"):
        check_tracking("http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="Ray cluster at ray://127.0.0.1:9 is unreachable"):
        check_ray_address("ray://127.0.0.1:9")
    check_tracking("sqlite:////tmp/x.db")  # local stores need no probe


@pytest.mark.parametrize("algorithm", ["optuna", "random"])
def test_points_to_evaluate_run_first_and_the_rest_is_drawn(algorithm):
    """The demo's first trial is the CE baseline (λ = 1) under either searcher; t and lr are drawn."""
    from sweeps.driver.tuner import search_algorithm

    spec, _ = load_sweep(ROOT / "search_spaces/demo.yaml", [f"search.algorithm={algorithm}"])
    search, param_space = search_algorithm(spec)
    assert param_space == {}  # Optuna's define-by-run space, also for a random search with points
    first, second = search.suggest("a"), search.suggest("b")
    assert trial_overrides(spec, first)["attention.lambda"] == 1.0
    assert 0.3 <= first["attention.threshold"] <= 0.7 and 3e-4 <= first["train.lr"] <= 3e-3
    assert trial_overrides(spec, second)["attention.lambda"] != 1.0  # then the search goes on


def test_values_that_take_no_effect_are_not_shown_as_searched():
    from sweeps.space import searched_values

    spec, _ = load_sweep(ROOT / "search_spaces/demo.yaml")
    ce = searched_values(
        spec, {"attention.lambda": {"kind": "fixed", "value": 1.0}, "attention.threshold": 0.4}
    )
    assert ce == {"attention.lambda": 1.0}  # no threshold beside λ = 1: plain cross-entropy
    soft = {"attention.lambda": {"kind": "fixed", "value": 0.5}, "attention.threshold": 0.4}
    assert searched_values(spec, soft) == {"attention.lambda": 0.5, "attention.threshold": 0.4}
    adaptive = {"attention.lambda": {"kind": "adaptive", "adaptive": {"slope": 0.1, "floor": 0.2}}}
    assert searched_values(spec, adaptive) == {
        "attention.lambda": "adaptive",
        "attention.schedule.slope": 0.1,
        "attention.schedule.floor": 0.2,
    }


def test_a_bad_sweep_file_is_refused_before_pytorch_or_sklearn_load():
    """Validation answers in well under a second: it imports neither PyTorch nor scikit-learn
    (they took ~6 s on 2 cores before any error could be printed)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sweeps.cli import app\n"
        "sys.argv = ['cxr-sweep', 'sweep', 'run', 'search_spaces/demo.yaml', '--set', 'metric=val_f1']\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
        "heavy = sorted(m for m in ('torch', 'sklearn', 'timm', 'ray', 'mlflow') if m in sys.modules)\n"
        "print('loaded:', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "did you mean val_f1_macro" in out.stderr
    assert "loaded: []" in out.stdout
